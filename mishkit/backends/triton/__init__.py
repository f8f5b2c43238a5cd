"""The ``triton`` backend: activation kernels (:mod:`.act`) and fused BatchNorm + activation
kernels (:mod:`.bn_act`), both over the formulas of :mod:`.math`.

This package's ``__init__`` imports nothing heavy: :mod:`mishkit.backends` decides when triton is
imported, and a broken triton install only makes this backend unavailable.
"""

from __future__ import annotations

import os


def interpret_mode() -> bool:
    """Triton's CPU interpreter (env TRITON_INTERPRET=1, which triton reads when it compiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
