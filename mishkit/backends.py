"""Which kernel backends exist on this machine, and why the others don't.

Backends: ``cuda`` (C++ extension, CUDA kernels), ``triton``, ``cpu`` (C++ extension, vectorized
CPU kernels) and ``torch`` (pure-PyTorch reference, always there). Loading the extension never
makes ``import mishkit`` fail: a missing or broken build gives one warning and the fallbacks.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")


# Plain module-level memo (not functools.cache) so torch.compile traces the lookups as constants.
_EXTENSION: tuple = ()
_TRITON_ERROR: list = []


def extension():
    """Return ``(module, None)`` or ``(None, reason)`` for the compiled ``mishkit._C``."""
    global _EXTENSION
    if not _EXTENSION:
        _EXTENSION = _load_extension()
    return _EXTENSION


def _load_extension():
    if os.environ.get("MISHKIT_DISABLE_EXT") == "1":
        return None, "disabled by MISHKIT_DISABLE_EXT=1"
    try:
        module = importlib.import_module("mishkit._C")
    except ModuleNotFoundError as exc:
        if exc.name != "mishkit._C":
            reason = f"mishkit._C failed to load: {exc}"
        else:
            reason = (
                "mishkit._C is not built (installed with MISHKIT_NO_EXT=1, or not rebuilt "
                "after a clean); reinstall with `pip install --no-build-isolation -e .`"
            )
    except (ImportError, OSError) as exc:
        reason = f"mishkit._C failed to load (ABI mismatch with torch {torch.__version__}?): {exc}"
    else:
        return module, None
    warnings.warn(
        f"mishkit: C++/CUDA kernels unavailable: {reason}. Falling back to Triton (GPU) or the "
        "pure-torch reference (CPU).",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, reason


def interpret_mode() -> bool:
    """Triton's CPU interpreter (env TRITON_INTERPRET=1, read by triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_import_error() -> str | None:
    if not _TRITON_ERROR:
        _TRITON_ERROR.append(_import_triton())
    return _TRITON_ERROR[0]


def _import_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    try:
        importlib.import_module("mishkit.triton_kernels")
    except Exception as exc:  # a broken triton install must not break mishkit
        return f"mishkit.triton_kernels failed to import: {type(exc).__name__}: {exc}"
    return None


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` can't run (on ``device``, if given), or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(('auto', *BACKENDS))}"
    if backend == "torch":
        return None
    if backend == "triton":
        if (reason := triton_import_error()) is not None:
            return reason
        if device is None:
            if torch.cuda.is_available() or interpret_mode():
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 was not set for CPU interpretation"
        if device.type == "cuda" or (device.type == "cpu" and interpret_mode()):
            return None
        return (
            f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a {device.type} tensor"
        )
    module, reason = extension()
    if module is None:
        return reason
    if backend == "cuda":
        if not module.with_cuda():
            return "mishkit._C was built without CUDA (no CUDA torch or nvcc at build time)"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
    wanted = "cuda" if backend == "cuda" else "cpu"
    if device is not None and device.type != wanted:
        return f"the {backend} backend runs on {wanted} tensors, got a {device.type} tensor"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on this machine (for tensors on ``device``, if given), fastest first."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if unavailable_reason(b, dev) is None]


def backend_status() -> dict[str, str]:
    """Every backend with 'available' or the reason it is not (what `mishkit info` prints)."""
    return {b: unavailable_reason(b) or "available" for b in BACKENDS}


def choose(backend: str, device: torch.device, op_name: str) -> str:
    """Resolve ``backend="auto"`` to the fastest backend for ``device``; validate a forced one."""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(
            f"mishkit.{op_name}: unknown backend {backend!r}; choose one of "
            f"{', '.join(('auto', *BACKENDS))}"
        )
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in order:
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"mishkit.{op_name}: backend {backend!r} is unavailable: {reason}")
    return backend
