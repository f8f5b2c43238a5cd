"""Recovering the pre-activation ``z`` from ``y = f(z)`` and one branch bit: the math every
backend's output-saving BatchNorm + activation kernels share.

Which activations invert, and how:

* **closed form** (``leaky_relu``, ``elu``, ``selu``, ``softplus``): an exact formula per branch,
  the branch being ``z < 0`` (``z < threshold / beta`` for softplus).
* **unimodal** (``mish``, ``silu``, ``gelu``, ``gelu_tanh``, ``tanhexp``, ``serf``, ``smish``,
  ``logish`` and any smooth activation registered later with the same shape: one minimum
  ``(z*, y*)``, strictly monotonic on each side, ``f -> 0-`` at ``-inf`` and ``f(z) / z -> k`` at
  ``+inf``): the bit says ``z < z*``, and :func:`inverse_table` holds ``z`` at 257 nodes of three
  variables in which the inverse is smooth, with its slope there (cubic Hermite interpolation):

  - right branch: ``t = sqrt(y - y*)`` on ``[0, T_R]``; beyond, ``z = y / k`` (exact to 1e-9);
  - left branch near the minimum: the same ``t`` on ``[0, T_L]`` (``y`` up to ``y* / 2``);
  - left tail: ``s = sqrt(log(-y*/2) - log(-y))``, down to the compute dtype's smallest ``y``.

  The tables are built once per activation and dtype by bisection on float64 formulas, so the
  interpolated ``z`` is within 2e-6 of the exact inverse of ``y`` (relative to ``max(|z|, 1)``,
  measured over ``[-700, 1e4]``): below float32's own resolution of ``z`` from a float32 ``y``,
  which is why float32 (and half inputs, which compute in float32) takes no Newton step, while
  float64 takes :data:`NEWTON_STEPS` steps ``z -= (f(z) - y) / f'(z)`` (kept on its branch).
* **not invertible**: activations with flat regions (``relu``, ``hardswish``, ``hardmish``;
  ``leaky_relu`` with slope 0, ``elu`` with ``alpha`` 0) lose ``z`` where they are constant.

Where the data itself limits the recovery (inherent, not a defect of the method): near the
minimum ``f' = 0``, so the rounding of ``y`` moves ``z`` by up to ``sqrt(2 ulp(y*) / f''(z*))``
(3e-4 for float32 Mish); where ``y`` underflows (or saturates, ELU's ``-alpha``) ``z`` is only known
to lie beyond that point, and the kernels return the point itself.

The table tensor's layout (read by the C++, CUDA and Triton kernels alike) is
``[header (HEADER values) | Z (3 (N + 1)) | M (3 (N + 1))]``: node values and slopes (per node
spacing) of the right, left and tail tables, in that order; the header's fields are the ``H_*``
indices below.
"""

from __future__ import annotations

import functools
import math

import torch

from .._checks import compute_dtype
from ..registry import SELU_ALPHA, SELU_SCALE, get_spec

TABLE_INTERVALS = 256  # N: nodes per table = N + 1
HEADER = 16
(H_Z_STAR, H_Y_STAR, H_INV_K, H_T_R, H_SCALE_R, H_T_L, H_SCALE_L, H_LOG_TL, H_SCALE_F,
 H_S_F) = range(10)
NEWTON_STEPS = {torch.float64: 2, torch.float32: 0}
CLOSED_FORM = ("leaky_relu", "elu", "selu", "softplus")
FLAT_REGIONS = {
    "relu": "it is 0 for every z <= 0",
    "hardswish": "it is 0 for every z <= -3",
    "hardmish": "it is 0 for every z <= -2",
}
_RIGHT_TAIL_TOLERANCE = 1e-9  # |f(z) / (k z) - 1| beyond T_R: y / k is the inverse there
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# Run at trace time under torch.compile: a fact about the activation, computed with float64
# bisections that Dynamo must not trace.
@torch.compiler.assume_constant_result
def invertibility_error(name: str, params: tuple) -> str | None:
    """Why activation ``name`` (canonical) with ``params`` cannot be recovered from its output,
    or None when it can."""
    spec = get_spec(name)
    kwargs = spec.kwargs(tuple(params))
    if name in FLAT_REGIONS:
        return FLAT_REGIONS[name]
    if name == "leaky_relu" and kwargs["negative_slope"] == 0:
        return "with negative_slope=0 it is 0 for every z <= 0"
    if name == "elu" and kwargs["alpha"] == 0:
        return "with alpha=0 it is 0 for every z <= 0"
    if name == "softplus" and kwargs["beta"] <= 0:
        return "only beta > 0 is supported (its branches are z < threshold / beta and above)"
    if name in CLOSED_FORM:
        return None
    try:
        _unimodal_shape(name)
    except ValueError as exc:
        return str(exc)
    return None


def branch_point(name: str, params: tuple) -> float:
    """The bit the forward stores is ``z < branch_point`` (the left branch)."""
    if name in ("leaky_relu", "elu", "selu"):
        return 0.0
    if name == "softplus":
        beta, threshold = params
        return threshold / beta
    return _unimodal_shape(name).z_star


# -- float64 formulas for building the tables ---------------------------------------------------
# The registry's gelu / gelu_tanh references compute 1 + erf / 1 + tanh, which cancels for z < -6:
# the tables need the left tail to full relative precision, so those two use the identical
# functions in their cancellation-free forms (as the compiled kernels do).
_TAIL_STABLE = {
    "gelu": (lambda z: 0.5 * z * torch.special.erfc(-z * _SQRT_HALF),
             lambda z: 0.5 * torch.special.erfc(-z * _SQRT_HALF)
             + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)),
    "gelu_tanh": (lambda z: z * torch.sigmoid(2 * _SQRT_2_OVER_PI * (z + 0.044715 * z**3)),
                  lambda z: _gelu_tanh_derivative(z)),
}


def _gelu_tanh_derivative(z):
    u = 2 * _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    s = torch.sigmoid(u)
    du = 2 * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
    return s + z * s * torch.sigmoid(-u) * du


def float64_forward(name: str):
    """f and f' of ``name`` for tables and float64 Newton steps (parameterless activations)."""
    if name in _TAIL_STABLE:
        return _TAIL_STABLE[name]
    spec = get_spec(name)
    return spec.reference, spec.derivative


class _Shape:
    """Minimum, slope at +inf and table ranges of a unimodal activation."""

    def __init__(self, z_star, y_star, k, t_right, t_left):
        self.z_star, self.y_star, self.k = z_star, y_star, k
        self.t_right, self.t_left = t_right, t_left
        self.log_tail = math.log(-(y_star + t_left * t_left))


@functools.cache
def _unimodal_shape(name: str) -> _Shape:
    spec = get_spec(name)
    if spec.params:
        raise ValueError("it has parameters, and only parameterless smooth activations are "
                         "tabulated")
    if not spec.smooth:
        raise ValueError("it is not smooth")
    f, df = float64_forward(name)
    grid = torch.linspace(-20.0, 40.0, 12001, dtype=torch.float64)  # f' resolvable in float64
    slope = df(grid)
    falling = slope < 0
    if not falling.any() or falling[-1] or not (falling[: int(falling.nonzero().max()) + 1]).all():
        raise ValueError("it is not strictly decreasing then increasing (one minimum)")
    lo = torch.tensor(float(grid[int(falling.nonzero().max())]), dtype=torch.float64)
    hi = lo + (grid[1] - grid[0])
    for _ in range(200):  # bisection on the sign of f'
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if df(mid) < 0 else (lo, mid)
    z_star = float((lo + hi) / 2)
    y_star = float(f(torch.tensor(z_star, dtype=torch.float64)))
    far = f(torch.tensor([-40.0, 1e3], dtype=torch.float64))
    k = float(far[1]) / 1e3
    if not (y_star < 0 and -1e-6 < float(far[0]) <= 0 and k > 0):
        raise ValueError("it does not tend to 0 from below at -inf and grow linearly at +inf")
    z = torch.linspace(0.0, 100.0, 100001, dtype=torch.float64)
    off = (f(z[1:]) / (k * z[1:]) - 1).abs() > _RIGHT_TAIL_TOLERANCE
    z_right = float(z[1:][off].max()) if off.any() else 1.0
    t_right = math.sqrt(float(f(torch.tensor(z_right, dtype=torch.float64))) - y_star)
    return _Shape(z_star, y_star, k, t_right, math.sqrt(-y_star / 2))


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive value of ``dtype`` (subnormal)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def _tail_floor(dtype: torch.dtype) -> float:
    # float64 stops at its smallest normal: bisection on subnormal y would give noisy nodes
    smallest = torch.finfo(dtype).tiny if dtype == torch.float64 else _smallest(dtype)
    return math.log(smallest)


def _bisect(f, y, lo, hi, increasing: bool):
    lo = torch.full_like(y, lo)
    hi = torch.full_like(y, hi)
    for _ in range(120):
        mid = (lo + hi) / 2
        fm = f(mid)
        up = fm < y if increasing else fm > y
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return (lo + hi) / 2


@functools.cache
def _float64_table(name: str, tail_floor: float) -> torch.Tensor:
    shape = _unimodal_shape(name)
    f, _ = float64_forward(name)
    n = TABLE_INTERVALS
    zs, ys = shape.z_star, shape.y_star
    s_tail = math.sqrt(shape.log_tail - tail_floor)
    right = functools.partial(_bisect, f, lo=zs, hi=2 * zs + 4 * shape.t_right**2 + 10,
                              increasing=True)
    left = functools.partial(_bisect, f, lo=-1e4, hi=zs, increasing=False)

    def near_min(t):
        return ys + t * t

    def tail(s):
        return -torch.exp(shape.log_tail - s * s)

    # (range, y of the variable, inverse on this table's branch, inverse on the other branch)
    tables = [(shape.t_right, near_min, right, left), (shape.t_left, near_min, left, right),
              (s_tail, tail, left, None)]
    values, slopes = [], []
    for q_max, y_of, inverse, other in tables:
        q = torch.linspace(0.0, q_max, n + 1, dtype=torch.float64)
        step = 1e-6 * q_max
        z = inverse(y_of(q))
        above = inverse(y_of(q + step))
        # below t = 0 the inverse continues on the other branch (z(t) is smooth through t = 0)
        below = inverse(y_of(q - step))
        if other is not None:
            below[0] = other(y_of(q[:1] + step))[0]
        values.append(z)
        slopes.append((above - below) / (2 * step) * (q_max / n))  # per node spacing
    header = torch.zeros(HEADER, dtype=torch.float64)
    header[H_Z_STAR], header[H_Y_STAR], header[H_INV_K] = zs, ys, 1 / shape.k
    header[H_T_R], header[H_SCALE_R] = shape.t_right, n / shape.t_right
    header[H_T_L], header[H_SCALE_L] = shape.t_left, n / shape.t_left
    header[H_LOG_TL], header[H_SCALE_F], header[H_S_F] = shape.log_tail, n / s_tail, s_tail
    return torch.cat([header, *values, *slopes])


_TABLES: dict[tuple, torch.Tensor] = {}
_EMPTY: dict[tuple, torch.Tensor] = {}


def inverse_table(name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The inverse table of ``name`` for inputs of ``dtype`` on ``device`` (cached; an empty
    tensor for the closed-form activations, which need none)."""
    compute = compute_dtype(dtype)
    key = (name, compute, torch.device(device))
    if name in CLOSED_FORM:
        if key not in _EMPTY:
            _EMPTY[key] = torch.empty(0, dtype=compute, device=device)
        return _EMPTY[key]
    if key not in _TABLES:
        table = _float64_table(name, _tail_floor(compute))
        _TABLES[key] = table.to(device=device, dtype=compute)
    return _TABLES[key]


def saturation_floors(name: str, params: tuple, dtype: torch.dtype) -> tuple[float, float]:
    """``(floor, log_floor)`` for outputs stored in ``dtype``: the closed forms' lowest
    recoverable ``z`` (where ``y`` saturates or underflows in ``dtype``), and ``log`` of the
    smallest ``|y|`` the unimodal tail lookup takes (``y = 0`` on the left branch means the true
    ``|y|`` was below half the smallest value of ``dtype``)."""
    eps, smallest = torch.finfo(dtype).eps, _smallest(dtype)
    log_floor = math.log(smallest) - math.log(2.0)
    if name in ("elu", "selu"):
        return math.log(eps / 4), log_floor  # expm1(z) rounds to -1 below this
    if name == "softplus":
        beta = params[0]
        # log(beta y) / beta as y -> 0
        return (math.log(beta * smallest) - math.log(2.0)) / beta, log_floor
    return -math.inf, log_floor


# -- the inverse in torch ops (the torch backend's kernels; the reference of the others) -------


def invert(y: torch.Tensor, left: torch.Tensor, table: torch.Tensor, name: str, params: tuple,
           storage_dtype: torch.dtype) -> torch.Tensor:
    """``z`` with ``f(z) = y`` on the branch ``left`` (``z < branch_point``) marks.

    ``y`` is in the compute dtype (float32 for half storage); the result too.
    """
    floor, log_floor = saturation_floors(name, params, storage_dtype)
    if name in CLOSED_FORM:
        return _closed_form(y, left, name, params, floor)
    n = TABLE_INTERVALS
    head = table[:HEADER].tolist()
    z_star, y_star = head[H_Z_STAR], head[H_Y_STAR]
    t = (y - y_star).clamp(min=0).sqrt()
    log_neg_y = torch.log(-y).nan_to_num(nan=log_floor).clamp(min=log_floor)  # y >= 0: floor
    s = (head[H_LOG_TL] - log_neg_y).clamp(min=0).sqrt()
    near = t <= head[H_T_L]
    q = torch.where(left, torch.where(near, t * head[H_SCALE_L], s * head[H_SCALE_F]),
                    t * head[H_SCALE_R])
    base = torch.where(left, torch.where(near, n + 1, 2 * (n + 1)), 0)
    q = q.nan_to_num(nan=0.0).clamp(0, n)
    index = q.floor().clamp(max=n - 1)
    w = q - index
    index = index.long() + base
    values, slopes = table[HEADER: HEADER + 3 * (n + 1)], table[HEADER + 3 * (n + 1):]
    w2 = w * w
    w3 = w2 * w
    z = ((2 * w3 - 3 * w2 + 1) * values[index] + (w3 - 2 * w2 + w) * slopes[index]
         + (3 * w2 - 2 * w3) * values[index + 1] + (w3 - w2) * slopes[index + 1])
    z = torch.where(~left & (t > head[H_T_R]), y * head[H_INV_K], z)
    if NEWTON_STEPS.get(y.dtype, 0):
        f, df = float64_forward(name)
        for _ in range(NEWTON_STEPS[y.dtype]):
            step = (f(z) - y) / df(z)
            z = z - torch.where(step.isfinite(), step, 0.0)
            z = torch.where(left, z.clamp(max=z_star), z.clamp(min=z_star))
    return torch.where(y.isnan(), y, z)


def _closed_form(y, left, name, params, floor):
    if name == "leaky_relu":
        (slope,) = params
        return torch.where(left, y / slope, y)
    if name == "elu":
        (alpha,) = params
        return torch.where(left, torch.log1p((y / alpha).clamp(min=-1)).clamp(min=floor), y)
    if name == "selu":
        below = torch.log1p((y / (SELU_SCALE * SELU_ALPHA)).clamp(min=-1)).clamp(min=floor)
        return torch.where(left, below, y / SELU_SCALE)
    beta, _ = params  # softplus: log(expm1(beta y)) / beta below threshold / beta
    return torch.where(left, (torch.log(torch.expm1(beta * y)) / beta).clamp(min=floor), y)
