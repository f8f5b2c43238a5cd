"""mishkit: fused Mish and friends for PyTorch.

Quick use::

    import mishkit
    y = mishkit.functional.mish(x)             # fused kernel, saves only x for backward
    model = mishkit.convert(model, "mish")     # swap a network's activations
"""

from . import functional
from .backends import available_backends, backend_status
from .registry import ACTIVATIONS, ActivationSpec, get_spec, register

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "available_backends",
    "backend_status",
    "functional",
    "get_spec",
    "register",
]


def __getattr__(name):
    # nn / convert / memory import lazily so `import mishkit` stays light
    import importlib

    if name in ("nn", "memory"):
        return importlib.import_module(f".{name}", __name__)
    lazy = {"convert": "conversion", "ConversionReport": "conversion",
            "UntraceableModuleError": "fx_rewrite"}
    if name in lazy:
        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'mishkit' has no attribute {name!r}")
