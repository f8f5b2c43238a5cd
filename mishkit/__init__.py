"""mishkit: fused Mish and friends for PyTorch.

Quick use::

    import mishkit
    y = mishkit.functional.mish(x)             # fused kernel, saves only x for backward
    model = mishkit.convert(model, "mish")     # swap a network's activations
"""

__version__ = "0.1.0"

from . import functional, memory, nn
from .backends import available_backends, backend_status
from .conversion import ConversionReport, UntraceableModuleError, convert
from .registry import ACTIVATIONS, ActivationSpec, get_spec, register

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "ConversionReport",
    "UntraceableModuleError",
    "available_backends",
    "backend_status",
    "convert",
    "functional",
    "get_spec",
    "memory",
    "nn",
    "register",
]
