"""What ``backend="auto"`` runs under ``torch.compile``: the kernels' formulas as plain torch ops.

mishkit's eager kernels are custom ops, opaque to Inductor: it can neither fuse them with the
convolution / BatchNorm around them nor let its min-cut partitioner recompute through them, so a
compiled model would keep every activation input alive. Under compilation the dispatch
(:func:`mishkit.ops.apply`, :func:`mishkit.batchnorm.batch_norm_act`) therefore calls
:func:`activation` instead, a chain of pointwise torch ops that Inductor fuses and rematerialises
like its own ``F.mish``.

Why a compile-time branch and not a decomposition registered for the custom ops: the same ops
serve a forced ``backend="cpu" | "cuda"``, which must keep running its kernel under compile, and
Inductor's decomposition table is global. Why an ``autograd.Function``: its backward is the
kernels' closed-form derivative (the limits at +-inf, torch's kink conventions) rather than what
autograd would derive from the forward ops (``inf * 0 = nan`` at the limits, a different value at
the kinks). It enters Dynamo's graph as one call (``torch.compiler.allow_in_graph``) that
AOTAutograd traces through, so the partitioner sees only pointwise aten ops (fullgraph, dynamic
shapes). The backward is itself differentiable torch ops, so double backward works wherever torch
supports it (Dynamo-only backends; AOTAutograd raises its own "does not currently support double
backward" for every compiled graph, native ops included).

Every formula mirrors its functor in ``csrc/activations.h`` (one ``exp`` for Mish instead of
``exp``, ``log1p`` and ``tanh``; overflow-safe clamps; NaN passing through comparisons) and runs in
the compute dtype. An activation without a formula here falls back to the registry's reference and
derivative: the same numerics, only slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._checks import compute_dtype
from ..registry import ACTIVATIONS, SELU_ALPHA, SELU_SCALE, get_spec
from .autograd import save_input_function

Formula = Callable[..., torch.Tensor]

_INV_SQRT_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715
_SATURATION = 20.0  # mish / tanhexp / serf corrections vanish beyond it, even in float64


# -- building blocks (as in csrc/activations.h) ----------------------------------------------------
# The forward formulas hold no torch.where with a scalar: the traced graph would share one constant
# node between all activations, and the partitioner refuses to recompute forward ops that read a
# node used far apart, so it would save an extra full-size tensor per block. They use clamps
# instead (which, like the kernels' selects, let NaN through); the derivatives run in backward,
# where that rule does not apply. masked_fill would do too, but it drops a channels_last layout.

# Every x * g(x) form has underflowed to exactly 0 (float32 and float64) at x = -1e4, so clamping
# there gives the limit 0 at -inf instead of -inf * 0 = nan, and changes no other value.
_UNDERFLOWED = -1e4


def _finite_below(x):
    return torch.clamp(x, min=_UNDERFLOWED)


def _limits(x, y, at_neg_inf: float, at_pos_inf: float | None = None):
    """The limits at x = -inf (and +inf) of a derivative: its x * g(x) terms give inf * 0."""
    y = torch.where(x == -math.inf, at_neg_inf, y)
    if at_pos_inf is not None:
        y = torch.where(x == math.inf, at_pos_inf, y)
    return y


def _saturate(x):
    return torch.clamp(x, max=_SATURATION)


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))  # exp overflows to inf -> exactly 0, no NaN


def _sigmoid_and_slope(x):
    """sigmoid(x) and s (1 - s) from u = e^-|x| in (0, 1]: no overflow, no cancellation."""
    u = torch.exp(-x.abs())
    r = 1.0 / (1.0 + u)
    return torch.where(x < 0, u * r, r), u * r * r


# -- the formulas: name -> (forward, derivative), each f(x, *params) in the compute dtype ----------


def _mish(x):
    x = _finite_below(x)
    e = torch.exp(_saturate(x))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


def _mish_grad(x):
    e = torch.exp(_saturate(x))
    n = e * (e + 2.0)
    q = n + 2.0
    d = n / q + x * (4.0 * e * (e + 1.0) / (q * q))  # x last: no 4 x overflow
    return _limits(x, torch.where(x > _SATURATION, 1.0, d), 0.0, 1.0)


def _silu(x):
    x = _finite_below(x)
    return x / (1.0 + torch.exp(-x))


def _silu_grad(x):
    s, slope = _sigmoid_and_slope(x)
    return _limits(x, s + x * slope, 0.0, 1.0)


def _gelu(x):
    x = _finite_below(x)
    return x * (0.5 * torch.erfc(x * -_INV_SQRT_2))  # erfc: no 1 + erf cancellation


def _gelu_grad(x):
    cdf = 0.5 * torch.erfc(x * -_INV_SQRT_2)
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return _limits(x, cdf + x * pdf, 0.0, 1.0)


def _gelu_tanh_two_z(x):
    return _TWO_SQRT_2_OVER_PI * x * (1.0 + _GELU_TANH_COEF * x * x)


def _gelu_tanh(x):
    # (1 + tanh z) / 2 = sigmoid(2 z): no cancellation for x << 0
    x = _finite_below(x)
    return x / (1.0 + torch.exp(-_gelu_tanh_two_z(x)))


def _gelu_tanh_grad(x):
    xc = torch.clamp(x, -10.0, 10.0)  # saturated beyond: avoids x^2 * 0 overflowing to inf * 0
    s, slope = _sigmoid_and_slope(_gelu_tanh_two_z(xc))
    two_z_grad = _TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * xc * xc)
    d = s + xc * slope * two_z_grad
    return torch.where(x > 10.0, 1.0, torch.where(x < -10.0, 0.0, d))


def _hardswish(x):
    x = _finite_below(x)
    return x * (torch.clamp(x + 3.0, 0.0, 6.0) / 6.0)


def _hardswish_grad(x):
    # torch's kink convention: 0 for x <= -3, x/3 + 1/2 below 3, 1 from 3 on (NaN -> 1)
    return torch.where(x <= -3.0, 0.0, torch.where(x < 3.0, x / 3.0 + 0.5, 1.0))


def _hardmish(x):
    x = _finite_below(x)
    return x * (torch.clamp(x + 2.0, 0.0, 2.0) / 2.0)


def _hardmish_grad(x):
    return torch.where(x < -2.0, 0.0, torch.where(x <= 0.0, x + 1.0, 1.0))


def _softplus(x, beta, threshold):
    bx = x * beta
    return torch.where(bx > threshold, x, torch.log1p(torch.exp(bx)) / beta)


def _softplus_grad(x, beta, threshold):
    bx = x * beta
    return torch.where(bx > threshold, 1.0, _sigmoid(bx))


def _tanhexp(x):
    x = _finite_below(x)
    m = torch.expm1(-2.0 * torch.exp(x))  # tanh(e) = -m / (2 + m), no cancellation
    return x * (-m / (2.0 + m))


def _tanhexp_grad(x):
    xc = _saturate(x)
    e = torch.exp(xc)
    m = torch.expm1(-2.0 * e)
    two_m = 2.0 + m
    d = -m / two_m + xc * e * (4.0 * (1.0 + m) / (two_m * two_m))
    return _limits(x, torch.where(x > _SATURATION, 1.0, d), 0.0)


def _softplus_default(x):
    return torch.where(x > _SATURATION, x, torch.log1p(torch.exp(x)))


# erf(s) = 2/sqrt(pi) sum_k (-1)^k s^(2k+1) / (k! (2k+1)); 13 terms reach float64 rounding at 1/2
_ERF_SERIES = [_TWO_OVER_SQRT_PI * (-1) ** k / (math.factorial(k) * (2 * k + 1)) for k in range(13)]


def _erf_nonneg(s):
    """erf(s) for s >= 0, to a few ulp: Inductor's vectorized float32 erf has an absolute error of
    1.5e-7, i.e. a large relative one near 0, where Serf needs erf(softplus(x)) for x << 0."""
    s2 = s * s
    series = _ERF_SERIES[-1]
    for coefficient in reversed(_ERF_SERIES[:-1]):
        series = series * s2 + coefficient
    return torch.where(s < 0.5, s * series, 1.0 - torch.erfc(s))


def _serf(x):
    x = _finite_below(x)
    return x * _erf_nonneg(_softplus_default(x))


def _serf_grad(x):
    sp = _softplus_default(x)
    derf = _TWO_OVER_SQRT_PI * torch.exp(-sp * sp)
    return _limits(x, _erf_nonneg(sp) + x * derf * _sigmoid(x), 0.0, 1.0)


def _smish(x):
    x = _finite_below(x)
    s = _sigmoid(x)
    m = s * (s + 2.0)  # tanh(log1p(s)) = m / (m + 2)
    return x * (m / (m + 2.0))


def _smish_grad(x):
    s, slope = _sigmoid_and_slope(x)
    m = s * (s + 2.0)
    q = m + 2.0
    d = m / q + x * (4.0 * (1.0 + s) * slope / (q * q))
    return _limits(x, d, 0.0, 0.6)  # tanh(log 2) = 3/5


def _logish(x):
    x = _finite_below(x)
    return x * torch.log1p(_sigmoid(x))


def _logish_grad(x):
    s, slope = _sigmoid_and_slope(x)
    return _limits(x, torch.log1p(s) + x * slope / (1.0 + s), 0.0, math.log(2.0))


def _relu(x):
    return torch.clamp(x, min=0.0)  # NaN propagates


def _relu_grad(x):
    return (x > 0.0).to(x.dtype)


def _leaky_relu(x, negative_slope):
    return torch.where(x > 0.0, x, x * negative_slope)


def _leaky_relu_grad(x, negative_slope):
    return torch.where(x > 0.0, 1.0, torch.full_like(x, negative_slope))


def _elu(x, alpha):
    return torch.where(x > 0.0, x, alpha * torch.expm1(x))


def _elu_grad(x, alpha):
    return torch.where(x > 0.0, 1.0, alpha * torch.exp(x))


def _selu(x):
    return SELU_SCALE * _elu(x, SELU_ALPHA)


def _selu_grad(x):
    return SELU_SCALE * _elu_grad(x, SELU_ALPHA)


FORMULAS: dict[str, tuple[Formula, Formula]] = {
    "mish": (_mish, _mish_grad),
    "silu": (_silu, _silu_grad),
    "gelu": (_gelu, _gelu_grad),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "hardswish": (_hardswish, _hardswish_grad),
    "hardmish": (_hardmish, _hardmish_grad),
    "softplus": (_softplus, _softplus_grad),
    "tanhexp": (_tanhexp, _tanhexp_grad),
    "serf": (_serf, _serf_grad),
    "smish": (_smish, _smish_grad),
    "logish": (_logish, _logish_grad),
    "relu": (_relu, _relu_grad),
    "leaky_relu": (_leaky_relu, _leaky_relu_grad),
    "elu": (_elu, _elu_grad),
    "selu": (_selu, _selu_grad),
}


def formulas(name: str) -> tuple[Formula, Formula]:
    """``(forward, derivative)`` of a canonical name, each ``f(x, *params)``."""
    if name in FORMULAS:
        return FORMULAS[name]
    spec = get_spec(name)  # no kernel-form formula: the registry's, with keyword parameters
    keys = tuple(spec.params)
    return (lambda x, *p: spec.reference(x, **dict(zip(keys, p))),
            lambda x, *p: spec.derivative(x, **dict(zip(keys, p))))


# -- the op ----------------------------------------------------------------------------------------


def forward(x: torch.Tensor, name: str, params) -> torch.Tensor:
    """``f(x)`` in the compute dtype, returned in ``x``'s dtype (not differentiable by itself)."""
    forward_formula, _ = formulas(name)
    return forward_formula(x.to(compute_dtype(x.dtype)), *params).to(x.dtype)


def backward(grad_out: torch.Tensor, x: torch.Tensor, name: str, params) -> torch.Tensor:
    """``grad_out * f'(x)`` in the compute dtype, returned in ``x``'s dtype."""
    _, derivative = formulas(name)
    compute = compute_dtype(x.dtype)
    return (grad_out.to(compute) * derivative(x.to(compute), *params)).to(x.dtype)


# f(x) as pointwise torch ops; backward grad_out * f'(x), saving only x
LoweredActivation = save_input_function("LoweredActivation", forward, backward)


def activation(x: torch.Tensor, name: str, params) -> torch.Tensor:
    """``f(x)`` for canonical ``name`` and its ordered ``params``, differentiable."""
    return _apply(x, list(ACTIVATIONS).index(name), tuple(float(p) for p in params))


# Dynamo would turn the autograd.Function into a higher-order op whose backward sees a detached
# x (no double backward); written into the graph as one call, it is traced by AOTAutograd like any
# autograd.Function instead, and runs as one under Dynamo-only backends. (allow_in_graph takes no
# strings: the activation travels as its registry index.)
@torch.compiler.allow_in_graph
def _apply(x: torch.Tensor, activation_id: int, params: tuple) -> torch.Tensor:
    return LoweredActivation.apply(x, list(ACTIVATIONS)[activation_id], params)
