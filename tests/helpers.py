"""What the tests share: tolerances, parameters, special input values and the saved-bytes probe."""

from __future__ import annotations

import math

import pytest
import torch

from mishkit import info
from mishkit.memory import saved_tensor_bytes
from mishkit.registry import ACTIVATIONS

# (rtol, atol) against the float64 reference: fp32 is the numerics contract; the half types allow
# one rounding of the float64 result (torch's defaults).
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6),
             torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
DTYPES = list(TOLERANCE)

# Non-default parameters, so parameter passing is exercised, not just defaults.
PARAMS = {"softplus": {"beta": 2.0, "threshold": 5.0}, "leaky_relu": {"negative_slope": 0.2},
          "elu": {"alpha": 0.7}}

# Inputs where formulas are fragile: signed zeros, subnormals (float32 1e-40, float64 1e-310),
# +-inf, nan, overflow thresholds of exp (88, 89, -104), saturation points (20, 30), kinks
# (0, +-2, +-3, 2.5 = softplus threshold 5 / beta 2), the Mish minimum (-1.19) and huge values.
SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1e-310, -1e-310, 1e-7, -1e-7, 1e-3, -1e-3, 0.49, -0.51,
           0.5, -0.5, 1.0, -1.0, -1.19, 2.0, -2.0, 2.5, 2.9999, -2.9999, 3.0, -3.0, 5.0, -5.0,
           10.5, -10.5, 15.0, -15.0, 19.9, 20.0, 20.1, -20.0, 20.5, 30.0, -30.0, 88.0, -88.0,
           89.0, 100.0, -100.0, -104.0, 1e4, -1e4, 1e20, -1e20, 3e38, -3e38,
           math.inf, -math.inf, math.nan]


# Each CPU build's requirements as csrc/cpu/act_dispatch.cpp checks them (__builtin_cpu_supports),
# written out here, so that the tests check mishkit.info's copy rather than use it.
CPU_BUILD_REQUIREMENTS = {
    "default": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
_CPU_FLAGS = info.cpu_model_and_flags()[1] or frozenset()
SUPPORTED_CPU_BUILDS = [name for name, needs in CPU_BUILD_REQUIREMENTS.items()
                        if _CPU_FLAGS.issuperset(needs)]


def cpu_build_params(names=tuple(CPU_BUILD_REQUIREMENTS)) -> list:
    """pytest params for the ``cpu_build`` fixture (conftest.py), skipped where this CPU lacks
    a build's instructions."""
    return [pytest.param(name, marks=pytest.mark.skipif(
        name not in SUPPORTED_CPU_BUILDS,
        reason=f"this CPU lacks {'/'.join(CPU_BUILD_REQUIREMENTS[name])}")) for name in names]


def param_list(name: str) -> list[float]:
    """The kernels' ordered parameter list for ``name``, with the non-default test values."""
    return list(ACTIVATIONS[name].bind((), PARAMS.get(name, {})))


def reference(name: str, x: torch.Tensor, **params) -> torch.Tensor:
    """The registry's float64 formula (params default to the activation's defaults)."""
    spec = ACTIVATIONS[name]
    return spec.reference(x.double(), **{**spec.params, **params})


def reference_grad(name: str, x: torch.Tensor, grad: torch.Tensor, **params) -> torch.Tensor:
    spec = ACTIVATIONS[name]
    return grad.double() * spec.derivative(x.double(), **{**spec.params, **params})


def kernel_expected(name: str, x: torch.Tensor, params, grad=None) -> torch.Tensor:
    """What a kernel given the ordered parameter list ``params`` must return: the float64
    formula at the (rounded) input, ``grad * f'(x)`` when ``grad`` is given, rounded once to x's
    dtype."""
    spec = ACTIVATIONS[name]
    kwargs = spec.kwargs(tuple(params))
    if grad is None:
        out = spec.reference(x.double(), **kwargs)
    else:
        out = grad.double() * spec.derivative(x.double(), **kwargs)
    return out.to(x.dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    """``actual`` within ``dtype``'s tolerance (default: ``expected``'s) of ``expected`` rounded
    to ``dtype``; nan == nan."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected.to(dtype), rtol=rtol, atol=atol, equal_nan=True)


def saved_bytes(fn, *inputs) -> int:
    """Activation bytes ``fn(*inputs)`` saves for backward (mishkit.memory's one definition)."""
    return saved_tensor_bytes(fn, *inputs).total


def assert_same_outputs_and_grads(model, reference, x, reference_params=None):
    """``model(x)`` and ``reference(x)`` agree in value, input gradient and every parameter
    gradient (in order); ``reference_params``: its parameters where ``reference`` is a function."""
    params = list(reference.parameters() if reference_params is None else reference_params)
    for p in [*model.parameters(), *params]:
        p.grad = None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = model(x1), reference(x2)
    torch.testing.assert_close(y1, y2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(model.named_parameters(), params, strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
