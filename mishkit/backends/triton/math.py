"""Triton device math for the activations: one forward and one derivative per registry entry.

Every helper runs both compiled (CUDA) and in Triton's CPU interpreter, so only core ops are used
(``tl.exp``, ``tl.erf``, ``tl.where``, arithmetic): no libdevice. The missing ``tanh``, ``expm1``
and ``log1p`` are built from exact identities plus short series, accurate to a few ulp in
float32 *and* float64 (float64 inputs are gradchecked). The semantics follow
``mishkit/registry.py``: the limits at +-inf (``mish(-inf) = 0``), NaN propagation, the kink
conventions and torch's softplus threshold. Constants that float32 cannot hold exactly go through
:func:`_const`, so float64 compute gets them in full precision on any Triton version.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

SQRT_HALF = tl.constexpr(math.sqrt(0.5))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
TWO_OVER_SQRT_PI = tl.constexpr(2.0 / math.sqrt(math.pi))
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
GELU_TANH_COEF = tl.constexpr(0.044715)
LOG_2 = tl.constexpr(math.log(2.0))
TANH_LOG_2 = tl.constexpr(0.6)  # tanh(log 2) = 3/5 exactly
SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
QUICK_GELU_COEF = tl.constexpr(1.702)
# beyond x = 20 the mish/tanhexp corrections are below float64 resolution (registry does the same)
SATURATION = tl.constexpr(20.0)
# series lengths: truncation error < 1e-17 relative, i.e. below float64 rounding
EXPM1_TERMS = tl.constexpr(17)  # Taylor on |x| < 1/2
LOG1P_TERMS = tl.constexpr(17)  # atanh series on z <= 1/3


@triton.jit
def _const(value: tl.constexpr, like):
    """``value`` in ``like``'s dtype, rounded once (a bare literal may pass through float32)."""
    return tl.full([], value, like.dtype)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))  # exp overflow -> inf -> 0: no NaN at -inf


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0: Horner Taylor series for |x| < 1/2."""
    acc = tl.full(x.shape, 1.0, x.dtype)
    for k in tl.static_range(EXPM1_TERMS, 1, -1):
        acc = 1.0 + acc * x * _const(1.0 / k, x)
    return tl.where(tl.abs(x) < 0.5, x * acc, tl.exp(x) - 1.0)


@triton.jit
def _log1p_unit(s):
    """log(1 + s) for s in [0, 1], as 2 atanh(s / (2 + s)) by its odd series (z <= 1/3)."""
    z = s / (2.0 + s)
    z2 = z * z
    acc = tl.zeros(s.shape, s.dtype)
    for k in tl.static_range(LOG1P_TERMS - 1, -1, -1):
        acc = acc * z2 + _const(1.0 / (2 * k + 1), s)
    return 2.0 * z * acc


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, exact tails."""
    return tl.where(x > 0, x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _tanh_nonneg(u):
    """tanh(u) for u >= 0 (or +inf) as -expm1(-2u) / (2 + expm1(-2u))."""
    m = _expm1(-2.0 * u)
    return -m / (2.0 + m)


@triton.jit
def _neg_inf_limit(x, y, at_neg_inf):
    return tl.where(x == -float("inf"), at_neg_inf, y)


@triton.jit
def _inf_limits(x, y, at_neg_inf, at_pos_inf):
    return tl.where(x == float("inf"), at_pos_inf, _neg_inf_limit(x, y, at_neg_inf))


# -- the activations: f(x, p0, p1) and f'(x, p0, p1); unused parameters are ignored --------------
# mish: tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2); 1 - tanh^2 = 4 (n + 1) / (n + 2)^2


@triton.jit
def mish_forward(x, p0, p1):
    e = tl.exp(tl.where(x > SATURATION, SATURATION, x))
    n = e * (e + 2.0)
    return _neg_inf_limit(x, x * (n / (n + 2.0)), 0.0)


@triton.jit
def mish_derivative(x, p0, p1):
    # one reciprocal r = 1 / (n + 2): tanh(softplus) = n r, sigmoid(x) sech^2 = 4 e (e + 1) r^2
    e = tl.exp(tl.where(x > SATURATION, SATURATION, x))
    n = e * (e + 2.0)
    r = 1.0 / (n + 2.0)
    grad = n * r + x * (4.0 * e * (e + 1.0) * (r * r))
    return _neg_inf_limit(x, tl.where(x > SATURATION, 1.0, grad), 0.0)


@triton.jit
def silu_forward(x, p0, p1):
    return _neg_inf_limit(x, x * _sigmoid(x), 0.0)


@triton.jit
def silu_derivative(x, p0, p1):
    return _inf_limits(x, _sigmoid(x) * (1.0 + x * _sigmoid(-x)), 0.0, 1.0)


@triton.jit
def gelu_forward(x, p0, p1):
    return _neg_inf_limit(x, 0.5 * x * (1.0 + tl.erf(x * _const(SQRT_HALF, x))), 0.0)


@triton.jit
def gelu_derivative(x, p0, p1):
    cdf = 0.5 * (1.0 + tl.erf(x * _const(SQRT_HALF, x)))
    pdf = tl.exp(-0.5 * x * x) * _const(INV_SQRT_2PI, x)
    return _inf_limits(x, cdf + x * pdf, 0.0, 1.0)


@triton.jit
def _gelu_tanh_inner(x):
    return _const(SQRT_2_OVER_PI, x) * (x + _const(GELU_TANH_COEF, x) * x * x * x)


@triton.jit
def gelu_tanh_forward(x, p0, p1):
    # x/2 (1 + tanh(y)) = x sigmoid(2y): the same function without the 1 + tanh cancellation
    return _neg_inf_limit(x, x * _sigmoid(2.0 * _gelu_tanh_inner(x)), 0.0)


@triton.jit
def gelu_tanh_derivative(x, p0, p1):
    y2 = 2.0 * _gelu_tanh_inner(x)
    s = _sigmoid(y2)
    half_sech2 = 2.0 * s * _sigmoid(-y2)  # (1 - tanh^2) / 2
    inner_grad = _const(SQRT_2_OVER_PI, x) * (1.0 + _const(3.0 * GELU_TANH_COEF, x) * x * x)
    # where sech^2 underflows the term is 0 even if x * inner_grad overflows
    term = tl.where(half_sech2 == 0.0, 0.0, x * half_sech2 * inner_grad)
    return s + term


@triton.jit
def _clamp(v, high):
    return tl.where(v < 0.0, 0.0, tl.where(v > high, high, v))  # NaN passes through


@triton.jit
def hardswish_forward(x, p0, p1):
    return _neg_inf_limit(x, x * (_clamp(x + 3.0, 6.0) / 6.0), 0.0)  # no x * 6 overflow


@triton.jit
def hardswish_derivative(x, p0, p1):
    # torch's kink convention: 0 up to and at -3, 1 from 3 on (NaN -> 1, as in the registry)
    return tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, x / 3.0 + 0.5, 1.0))


@triton.jit
def hardmish_forward(x, p0, p1):
    return _neg_inf_limit(x, x * (_clamp(x + 2.0, 2.0) / 2.0), 0.0)  # no x * 2 overflow


@triton.jit
def hardmish_derivative(x, p0, p1):
    return tl.where(x < -2.0, 0.0, tl.where(x <= 0.0, x + 1.0, 1.0))


@triton.jit
def softplus_forward(x, beta, threshold):
    bx = x * beta
    return tl.where(bx > threshold, x, _softplus(bx) / beta)


@triton.jit
def softplus_derivative(x, beta, threshold):
    bx = x * beta
    return tl.where(bx > threshold, 1.0, _sigmoid(bx))


@triton.jit
def tanhexp_forward(x, p0, p1):
    return _neg_inf_limit(x, x * _tanh_nonneg(tl.exp(x)), 0.0)


@triton.jit
def tanhexp_derivative(x, p0, p1):
    xc = tl.where(x > SATURATION, SATURATION, x)  # avoids inf * 0 (registry clamps the same way)
    e = tl.exp(xc)
    sech2 = 4.0 * tl.exp(-2.0 * e) / ((2.0 + _expm1(-2.0 * e)) * (2.0 + _expm1(-2.0 * e)))
    grad = _tanh_nonneg(e) + xc * e * sech2
    return _neg_inf_limit(x, tl.where(x > SATURATION, 1.0, grad), 0.0)


@triton.jit
def _softplus_torch(x):
    return tl.where(x > SATURATION, x, _softplus(x))  # F.softplus's default threshold 20


@triton.jit
def serf_forward(x, p0, p1):
    return _neg_inf_limit(x, x * tl.erf(_softplus_torch(x)), 0.0)


@triton.jit
def serf_derivative(x, p0, p1):
    sp = _softplus_torch(x)
    derf = _const(TWO_OVER_SQRT_PI, x) * tl.exp(-sp * sp)
    return _inf_limits(x, tl.erf(sp) + x * derf * _sigmoid(x), 0.0, 1.0)


# smish: tanh(log(1 + s)) = m / (m + 2) with m = s (s + 2); 1 - tanh^2 = 4 (m + 1) / (m + 2)^2
@triton.jit
def smish_forward(x, p0, p1):
    s = _sigmoid(x)
    m = s * (s + 2.0)
    return _neg_inf_limit(x, x * (m / (m + 2.0)), 0.0)


@triton.jit
def smish_derivative(x, p0, p1):
    s = _sigmoid(x)
    m = s * (s + 2.0)
    sech2 = 4.0 * (m + 1.0) / ((m + 2.0) * (m + 2.0))
    grad = m / (m + 2.0) + x * sech2 * s * _sigmoid(-x) / (1.0 + s)
    return _inf_limits(x, grad, 0.0, _const(TANH_LOG_2, x))


@triton.jit
def logish_forward(x, p0, p1):
    return _neg_inf_limit(x, x * _log1p_unit(_sigmoid(x)), 0.0)


@triton.jit
def logish_derivative(x, p0, p1):
    s = _sigmoid(x)
    grad = _log1p_unit(s) + x * s * _sigmoid(-x) / (1.0 + s)
    return _inf_limits(x, grad, 0.0, _const(LOG_2, x))


@triton.jit
def relu_forward(x, p0, p1):
    return tl.where(x <= 0.0, 0.0, x)  # NaN fails the test and passes through


@triton.jit
def relu_derivative(x, p0, p1):
    return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def leaky_relu_forward(x, negative_slope, p1):
    return tl.where(x > 0.0, x, x * negative_slope)


@triton.jit
def leaky_relu_derivative(x, negative_slope, p1):
    # the broadcast keeps float64 compute: a 0-d parameter beside a literal would become float32
    return tl.where(x > 0.0, 1.0, negative_slope + tl.zeros_like(x))


@triton.jit
def elu_forward(x, alpha, p1):
    return tl.where(x > 0.0, x, alpha * _expm1(x))


@triton.jit
def elu_derivative(x, alpha, p1):
    return tl.where(x > 0.0, 1.0, alpha * tl.exp(x))


@triton.jit
def selu_forward(x, p0, p1):
    return _const(SELU_SCALE, x) * tl.where(x > 0.0, x, _const(SELU_ALPHA, x) * _expm1(x))


@triton.jit
def selu_derivative(x, p0, p1):
    return _const(SELU_SCALE, x) * tl.where(x > 0.0, 1.0, _const(SELU_ALPHA, x) * tl.exp(x))


@triton.jit
def quick_gelu_forward(x, p0, p1):
    return _neg_inf_limit(x, x * _sigmoid(_const(QUICK_GELU_COEF, x) * x), 0.0)


@triton.jit
def quick_gelu_derivative(x, p0, p1):
    k = _const(QUICK_GELU_COEF, x)
    s = _sigmoid(k * x)
    # (x s) first: k x alone may overflow where s has already underflowed to 0
    return _inf_limits(x, s + (x * s) * (k * _sigmoid(-k * x)), 0.0, 1.0)


# -- selection: one id per activation, resolved at compile time (constexpr) ---------------------
MISH, SILU, GELU, GELU_TANH, HARDSWISH = (tl.constexpr(i) for i in range(5))
HARDMISH, SOFTPLUS, TANHEXP, SERF, SMISH = (tl.constexpr(i) for i in range(5, 10))
LOGISH, RELU, LEAKY_RELU, ELU, SELU = (tl.constexpr(i) for i in range(10, 15))
QUICK_GELU = tl.constexpr(15)

ACTIVATION_IDS: dict[str, int] = {
    "mish": MISH.value, "silu": SILU.value, "gelu": GELU.value, "gelu_tanh": GELU_TANH.value,
    "hardswish": HARDSWISH.value, "hardmish": HARDMISH.value, "softplus": SOFTPLUS.value,
    "tanhexp": TANHEXP.value, "serf": SERF.value, "smish": SMISH.value, "logish": LOGISH.value,
    "relu": RELU.value, "leaky_relu": LEAKY_RELU.value, "elu": ELU.value, "selu": SELU.value,
    "quick_gelu": QUICK_GELU.value,
}  # fmt: skip


@triton.jit
def forward_math(x, p0, p1, ACT: tl.constexpr):
    """f(x) for activation id ``ACT``; compiled to that single formula."""
    if ACT == MISH:
        y = mish_forward(x, p0, p1)
    elif ACT == SILU:
        y = silu_forward(x, p0, p1)
    elif ACT == GELU:
        y = gelu_forward(x, p0, p1)
    elif ACT == GELU_TANH:
        y = gelu_tanh_forward(x, p0, p1)
    elif ACT == HARDSWISH:
        y = hardswish_forward(x, p0, p1)
    elif ACT == HARDMISH:
        y = hardmish_forward(x, p0, p1)
    elif ACT == SOFTPLUS:
        y = softplus_forward(x, p0, p1)
    elif ACT == TANHEXP:
        y = tanhexp_forward(x, p0, p1)
    elif ACT == SERF:
        y = serf_forward(x, p0, p1)
    elif ACT == SMISH:
        y = smish_forward(x, p0, p1)
    elif ACT == LOGISH:
        y = logish_forward(x, p0, p1)
    elif ACT == RELU:
        y = relu_forward(x, p0, p1)
    elif ACT == LEAKY_RELU:
        y = leaky_relu_forward(x, p0, p1)
    elif ACT == ELU:
        y = elu_forward(x, p0, p1)
    elif ACT == SELU:
        y = selu_forward(x, p0, p1)
    else:
        tl.static_assert(ACT == QUICK_GELU, "unknown activation id")
        y = quick_gelu_forward(x, p0, p1)
    return y


@triton.jit
def derivative_math(x, p0, p1, ACT: tl.constexpr):
    """f'(x) for activation id ``ACT``; compiled to that single formula."""
    if ACT == MISH:
        d = mish_derivative(x, p0, p1)
    elif ACT == SILU:
        d = silu_derivative(x, p0, p1)
    elif ACT == GELU:
        d = gelu_derivative(x, p0, p1)
    elif ACT == GELU_TANH:
        d = gelu_tanh_derivative(x, p0, p1)
    elif ACT == HARDSWISH:
        d = hardswish_derivative(x, p0, p1)
    elif ACT == HARDMISH:
        d = hardmish_derivative(x, p0, p1)
    elif ACT == SOFTPLUS:
        d = softplus_derivative(x, p0, p1)
    elif ACT == TANHEXP:
        d = tanhexp_derivative(x, p0, p1)
    elif ACT == SERF:
        d = serf_derivative(x, p0, p1)
    elif ACT == SMISH:
        d = smish_derivative(x, p0, p1)
    elif ACT == LOGISH:
        d = logish_derivative(x, p0, p1)
    elif ACT == RELU:
        d = relu_derivative(x, p0, p1)
    elif ACT == LEAKY_RELU:
        d = leaky_relu_derivative(x, p0, p1)
    elif ACT == ELU:
        d = elu_derivative(x, p0, p1)
    elif ACT == SELU:
        d = selu_derivative(x, p0, p1)
    else:
        tl.static_assert(ACT == QUICK_GELU, "unknown activation id")
        d = quick_gelu_derivative(x, p0, p1)
    return d
