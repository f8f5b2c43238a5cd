"""The activation registry: one :class:`ActivationSpec` per activation, the single source of truth.

Each entry holds the public name, aliases, scalar parameters with defaults, the float64 torch
reference formula (also the forward of the pure-torch backend), its derivative (the backward of the
pure-torch backend, and the basis of every backend's double backward), a docs formula and
properties. The C++/CUDA kernels (``csrc/activations.h``) and the Triton kernels
(``mishkit/backends/triton/math.py``) each hold one forward and one derivative per name listed here.

Reference formulas return the mathematical limit at +-inf (e.g. ``mish(-inf) = 0``) where the
naive product would give ``inf * 0 = nan``; torch's native ops return nan there. This is an
intentional, documented deviation, and every backend follows the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

Formula = Callable[..., torch.Tensor]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715
QUICK_GELU_COEF = 1.702
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class ActivationSpec:
    """Everything mishkit knows about one activation, independent of any backend."""

    name: str
    module_name: str  # class name in mishkit.nn
    formula: str  # human-readable definition (docs, plots)
    reference: Formula  # f(x, **params), exact in float64
    derivative: Formula  # f'(x, **params), differentiable torch ops (gives double backward)
    params: dict[str, float] = field(default_factory=dict)  # ordered: kernels take them in order
    aliases: tuple[str, ...] = ()
    native: Formula | None = None  # torch's own functional op with the same semantics, if any
    torch_module: str | None = None  # torch.nn class this is a drop-in for
    monotonic: bool = False
    bounded_below: bool = True
    smooth: bool = True  # C-infinity
    # parameters that may be +-inf (a threshold: inf switches the cut-off off, as torch allows)
    infinite_params: tuple[str, ...] = ()
    # the parameters' defaults as the ordered float tuple the kernels take (the common call's)
    defaults: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "defaults", tuple(map(float, self.params.values())))

    def bind(self, args: tuple, kwargs: dict) -> tuple[float, ...]:
        """Resolve positional/keyword parameters to the ordered float tuple the kernels take."""
        if not args and not kwargs:  # the defaults (the common call, so without the checks)
            return self.defaults
        names = list(self.params)
        if len(args) > len(names):
            raise TypeError(
                f"{self.name}() takes {len(names)} parameter(s) {names}, got {len(args)} positional"
            )
        values = dict(self.params)
        for key, value in zip(names, args):
            values[key] = value
        for key, value in kwargs.items():
            if key not in values:
                raise TypeError(f"{self.name}() got an unexpected parameter {key!r}; takes {names}")
            if key in names[: len(args)]:
                raise TypeError(f"{self.name}() got multiple values for parameter {key!r}")
            values[key] = value
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{self.name}() parameter {key!r} must be a number, got {value!r}")
            if math.isnan(value) or (math.isinf(value) and key not in self.infinite_params):
                allowed = "finite or +-inf" if key in self.infinite_params else "finite"
                raise ValueError(
                    f"{self.name}() parameter {key!r} must be {allowed}, got {value!r}")
        return tuple(float(values[k]) for k in names)

    def kwargs(self, params: tuple[float, ...]) -> dict[str, float]:
        return dict(zip(self.params, params))


ACTIVATIONS: dict[str, ActivationSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ActivationSpec) -> ActivationSpec:
    """Add an activation. Kernels for it must exist in every compiled backend (see README)."""
    for key in (spec.name, *spec.aliases):
        if key in ACTIVATIONS or key in _ALIASES:
            raise ValueError(f"activation name or alias {key!r} is already registered")
    ACTIVATIONS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def valid_names() -> list[str]:
    return sorted([*ACTIVATIONS, *_ALIASES])


def get_spec(name: str) -> ActivationSpec:
    """Look up by canonical name or alias (case-insensitive, '-' == '_')."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    try:
        return ACTIVATIONS[key]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid names and aliases: {', '.join(valid_names())}"
        ) from None


# -- helpers for the formulas ----------------------------------------------------------------------


def _limits(x: torch.Tensor, y: torch.Tensor, at_neg_inf: float, at_pos_inf: float | None = None):
    """Replace the value at x = -inf (and +inf) by the mathematical limit: inf * 0 gives nan."""
    y = torch.where(x == -math.inf, torch.full_like(y, at_neg_inf), y)
    if at_pos_inf is not None:
        y = torch.where(x == math.inf, torch.full_like(y, at_pos_inf), y)
    return y


def _mish(x):
    return _limits(x, x * torch.tanh(F.softplus(x)), 0.0)


def _mish_grad(x):
    t = torch.tanh(F.softplus(x))
    return _limits(x, t + x * torch.sigmoid(x) * (1 - t * t), 0.0, 1.0)


def _silu(x):
    return _limits(x, x * torch.sigmoid(x), 0.0)


def _silu_grad(x):
    s = torch.sigmoid(x)
    return _limits(x, s * (1 + x * (1 - s)), 0.0, 1.0)


def _gelu(x):
    return _limits(x, 0.5 * x * (1 + torch.erf(x * math.sqrt(0.5))), 0.0)


def _gelu_grad(x):
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return _limits(x, cdf + x * pdf, 0.0, 1.0)


# 0.5 * (1 + tanh(u)) = sigmoid(2u): the sigmoid form keeps float32 accurate for x << 0, where
# 1 + tanh(u) and 1 - tanh(u)^2 cancel (30% relative error in f'(-5) in float32)
def _gelu_tanh_arg(x):
    return 2 * _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x**3)


def _gelu_tanh(x):
    return _limits(x, x * torch.sigmoid(_gelu_tanh_arg(x)), 0.0)


def _gelu_tanh_grad(x):
    # beyond |x| = 10 the derivative has saturated to 0 / 1 even in float64; clamping avoids the
    # inf * 0 of x^3 overflowing (|x| > ~1e154 in float64)
    xc = torch.clamp(x, -10.0, 10.0)
    v = _gelu_tanh_arg(xc)
    inner_grad = 2 * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_COEF * xc * xc)  # dv/dx
    d = torch.sigmoid(v) * (1 + xc * torch.sigmoid(-v) * inner_grad)
    return torch.where(x > 10, 1.0, torch.where(x < -10, 0.0, d)).to(x.dtype)


def _quick_gelu(x):
    return _limits(x, x * torch.sigmoid(QUICK_GELU_COEF * x), 0.0)


def _quick_gelu_grad(x):
    s = torch.sigmoid(QUICK_GELU_COEF * x)
    # (x s) first: k x alone may overflow where s has already underflowed to 0
    return _limits(x, s + (x * s) * (QUICK_GELU_COEF * (1 - s)), 0.0, 1.0)


def _hardswish(x):
    return _limits(x, x * (torch.clamp(x + 3, 0, 6) / 6), 0.0)  # no x * 6 overflow


def _hardswish_grad(x):
    # torch's convention at the kinks: 0 for x <= -3, x/3 + 1/2 for x < 3, 1 from 3 on
    return torch.where(x <= -3, 0.0, torch.where(x < 3, x / 3 + 0.5, 1.0)).to(x.dtype)


def _hardmish(x):
    return _limits(x, x * (torch.clamp(x + 2, 0, 2) / 2), 0.0)  # no x * 2 overflow


def _hardmish_grad(x):
    return torch.where(x < -2, 0.0, torch.where(x <= 0, x + 1, 1.0)).to(x.dtype)


def _softplus(x, beta, threshold):
    bx = x * beta
    # log(1 + e^bx) = max(bx, 0) + log1p(e^-|bx|): no overflow where threshold = inf lets bx grow
    softplus = bx.clamp(min=0) + torch.log1p(torch.exp(-bx.abs()))
    return torch.where(bx > threshold, x, softplus / beta)


def _softplus_grad(x, beta, threshold):
    bx = x * beta
    return torch.where(bx > threshold, torch.ones_like(x), torch.sigmoid(bx))


def _tanhexp(x):
    return _limits(x, x * torch.tanh(torch.exp(x)), 0.0)


def _tanhexp_grad(x):
    # beyond x = 20, tanh(e^x) == 1 and sech^2(e^x) == 0 even in float64; avoids inf * 0
    xc = torch.clamp(x, max=20.0)
    e = torch.exp(xc)
    t = torch.tanh(e)
    return _limits(x, torch.where(x > 20, 1.0, t + xc * e * (1 - t * t)).to(x.dtype), 0.0)


def _serf(x):
    return _limits(x, x * torch.erf(F.softplus(x)), 0.0)


def _serf_grad(x):
    sp = F.softplus(x)
    derf = 2 / math.sqrt(math.pi) * torch.exp(-sp * sp)
    return _limits(x, torch.erf(sp) + x * derf * torch.sigmoid(x), 0.0, 1.0)


def _smish(x):
    return _limits(x, x * torch.tanh(torch.log1p(torch.sigmoid(x))), 0.0)


def _smish_grad(x):
    s = torch.sigmoid(x)
    t = torch.tanh(torch.log1p(s))
    return _limits(x, t + x * (1 - t * t) * s * (1 - s) / (1 + s), 0.0, math.tanh(math.log(2)))


def _logish(x):
    return _limits(x, x * torch.log1p(torch.sigmoid(x)), 0.0)


def _logish_grad(x):
    s = torch.sigmoid(x)
    return _limits(x, torch.log1p(s) + x * s * (1 - s) / (1 + s), 0.0, math.log(2))


def _relu(x):
    return torch.where(x > 0, x, torch.where(x.isnan(), x, 0.0))


def _relu_grad(x):
    return (x > 0).to(x.dtype)


def _leaky_relu(x, negative_slope):
    return torch.where(x > 0, x, x * negative_slope)


def _leaky_relu_grad(x, negative_slope):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope))


def _elu(x, alpha):
    return torch.where(x > 0, x, alpha * torch.expm1(x))


def _elu_grad(x, alpha):
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x))


def _selu(x):
    return SELU_SCALE * _elu(x, SELU_ALPHA)


def _selu_grad(x):
    return SELU_SCALE * _elu_grad(x, SELU_ALPHA)


# -- the registry ----------------------------------------------------------------------------------
# fmt: off
register(ActivationSpec("mish", "Mish", "x * tanh(softplus(x))", _mish, _mish_grad,
                        native=F.mish, torch_module="Mish"))
register(ActivationSpec("silu", "SiLU", "x * sigmoid(x)", _silu, _silu_grad, aliases=("swish",),
                        native=F.silu, torch_module="SiLU"))
register(ActivationSpec("gelu", "GELU", "x * Phi(x)  (erf form)", _gelu, _gelu_grad,
                        aliases=("gelu_erf",), native=F.gelu, torch_module="GELU"))
register(ActivationSpec("gelu_tanh", "GELUTanh",
                        "x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))",
                        _gelu_tanh, _gelu_tanh_grad, aliases=("gelu_approx",),
                        native=partial(F.gelu, approximate="tanh")))
register(ActivationSpec("hardswish", "Hardswish", "x * relu6(x + 3) / 6", _hardswish,
                        _hardswish_grad, aliases=("hard_swish",), native=F.hardswish,
                        torch_module="Hardswish", smooth=False))
register(ActivationSpec("hardmish", "HardMish", "x * min(2, max(0, x + 2)) / 2", _hardmish,
                        _hardmish_grad, aliases=("hard_mish",), smooth=False))
register(ActivationSpec("softplus", "Softplus",
                        "log(1 + exp(beta x)) / beta  (x where beta x > threshold)",
                        _softplus, _softplus_grad, params={"beta": 1.0, "threshold": 20.0},
                        native=F.softplus, torch_module="Softplus", monotonic=True,
                        infinite_params=("threshold",)))
register(ActivationSpec("tanhexp", "TanhExp", "x * tanh(exp(x))", _tanhexp, _tanhexp_grad,
                        aliases=("tanh_exp",)))
register(ActivationSpec("serf", "Serf", "x * erf(log(1 + exp(x)))", _serf, _serf_grad))
register(ActivationSpec("smish", "Smish", "x * tanh(log(1 + sigmoid(x)))", _smish, _smish_grad))
register(ActivationSpec("logish", "Logish", "x * log(1 + sigmoid(x))", _logish, _logish_grad))
register(ActivationSpec("relu", "ReLU", "max(0, x)", _relu, _relu_grad, native=F.relu,
                        torch_module="ReLU", monotonic=True, smooth=False))
register(ActivationSpec("leaky_relu", "LeakyReLU", "x if x > 0 else negative_slope * x",
                        _leaky_relu, _leaky_relu_grad, params={"negative_slope": 0.01},
                        aliases=("leakyrelu",), native=F.leaky_relu, torch_module="LeakyReLU",
                        monotonic=True, bounded_below=False, smooth=False))
register(ActivationSpec("elu", "ELU", "x if x > 0 else alpha * (exp(x) - 1)", _elu, _elu_grad,
                        params={"alpha": 1.0}, native=F.elu, torch_module="ELU", monotonic=True,
                        smooth=False))
register(ActivationSpec("selu", "SELU", "scale * elu(x, alpha) with the SELU constants", _selu,
                        _selu_grad, native=F.selu, torch_module="SELU", monotonic=True,
                        smooth=False))
register(ActivationSpec("quick_gelu", "QuickGELU", "x * sigmoid(1.702 x)  (CLIP's GELU)",
                        _quick_gelu, _quick_gelu_grad))
# fmt: on
