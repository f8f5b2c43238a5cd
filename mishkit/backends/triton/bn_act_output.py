"""Triton kernels for BatchNorm + activation that saves only its output (the contract:
:mod:`mishkit.batchnorm.output`; the inverse: :mod:`mishkit.backends.inversion`).

Registered as ``torch.ops.mishkit.triton_bn_act_output_{forward,backward_reduce,backward_elemt}``.
Tensors are dense (NCHW-contiguous or channels_last); element ``(n, c, s)`` of the flattened
spatial index ``s`` lives at ``n * stride_n + c * stride_c + s * stride_s``.

* forward: each program owns ``BYTES`` whole bytes of the mask, i.e. a ``[BYTES, 8]`` tile of
  consecutive elements, so the bits of a byte are summed in registers and stored once.
* backward_reduce: one program per block of channels walks all ``N * S`` rows in tiles;
  backward_elemt: flat elementwise. Both read bit ``i & 7`` of mask byte ``i >> 3`` and recover
  ``z`` by :func:`invert`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._checks import BnActOutputKernels, compute_dtype
from ..inversion import HEADER, NEWTON_STEPS, TABLE_INTERVALS, saturation_floors
from . import interpret_mode
from .kernel_io import check_bn_tensors
from .math import (
    ACTIVATION_IDS,
    ELU,
    LEAKY_RELU,
    SELU,
    SELU_ALPHA,
    SELU_SCALE,
    SOFTPLUS,
    _expm1,
    derivative_math,
    forward_math,
)

_N = tl.constexpr(TABLE_INTERVALS)
_NODES = tl.constexpr(TABLE_INTERVALS + 1)
_HEADER = tl.constexpr(HEADER)
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# The CPU interpreter runs each program in numpy: small blocks keep the tiny test tensors fast.
_INTERPRET = interpret_mode()
MASK_BYTES = 8 if _INTERPRET else 128  # bytes (x 8 elements) per forward program
BLOCK = 64 if _INTERPRET else 1024  # elements per backward_elemt program


@triton.jit
def _channel_of(i, C, stride_c):
    return (i // stride_c) % C


@triton.jit
def _rows(y_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s, BLOCK_R: tl.constexpr,
          COMPUTE: tl.constexpr):
    """Rows ``start .. start + BLOCK_R`` (flattened n, spatial) of channels ``c``: the values,
    their offsets and the mask, as [BLOCK_R, BLOCK_C] tiles."""
    r = start + tl.arange(0, BLOCK_R).to(tl.int64)
    offsets = ((r // S) * stride_n + (r % S) * stride_s)[:, None] + c[None, :] * stride_c
    valid = (r < R)[:, None] & c_mask[None, :]
    return tl.load(y_ptr + offsets, mask=valid, other=0.0).to(COMPUTE), offsets, valid


@triton.jit
def _max_of(a, b):
    return tl.where(a > b, a, b)  # NaN in a gives b


@triton.jit
def _min_of(a, b):
    return tl.where(a < b, a, b)


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulp for u > -1: log(w) u / (w - 1) corrects the rounding of w = 1 + u."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _hermite(table_ptr, q, base):
    """Cubic Hermite interpolation at q in [0, N] of the table starting at node ``base``."""
    i = _min_of(tl.floor(q), _N - 1.0)
    w = q - i
    at = (i + base).to(tl.int32)
    values = table_ptr + _HEADER
    slopes = values + 3 * _NODES
    z0 = tl.load(values + at)
    z1 = tl.load(values + at + 1)
    m0 = tl.load(slopes + at)
    m1 = tl.load(slopes + at + 1)
    w2 = w * w
    w3 = w2 * w
    return ((2.0 * w3 - 3.0 * w2 + 1.0) * z0 + (w3 - 2.0 * w2 + w) * m0
            + (3.0 * w2 - 2.0 * w3) * z1 + (w3 - w2) * m1)


@triton.jit
def _invert_tabulated(y, left, table_ptr, p0, p1, log_floor, ACT: tl.constexpr,
                      NEWTON: tl.constexpr):
    z_star = tl.load(table_ptr + 0)
    y_star = tl.load(table_ptr + 1)
    inv_k = tl.load(table_ptr + 2)
    t_right = tl.load(table_ptr + 3)
    scale_right = tl.load(table_ptr + 4)
    t_left = tl.load(table_ptr + 5)
    scale_left = tl.load(table_ptr + 6)
    log_tail = tl.load(table_ptr + 7)
    scale_tail = tl.load(table_ptr + 8)
    t = tl.sqrt(_max_of(y - y_star, 0.0))  # y below y* (rounding): the minimum
    log_neg = _max_of(tl.log(-y), log_floor)  # y >= 0 or NaN: the floor
    s = tl.sqrt(_max_of(log_tail - log_neg, 0.0))
    near = t <= t_left
    q = tl.where(left, tl.where(near, t * scale_left, s * scale_tail), t * scale_right)
    base = tl.where(left, tl.where(near, 1.0 * _NODES, 2.0 * _NODES), 0.0)
    q = _max_of(_min_of(q, 1.0 * _N), 0.0)  # NaN -> N: in bounds
    z = _hermite(table_ptr, q, base)
    z = tl.where(left, z, tl.where(t > t_right, y * inv_k, z))
    for _ in tl.static_range(NEWTON):
        step = (forward_math(z, p0, p1, ACT) - y) / derivative_math(z, p0, p1, ACT)
        z = tl.where(tl.abs(step) < float("inf"), z - step, z)  # f' = 0 or NaN: no step
        z = tl.where(left, _min_of(z, z_star), _max_of(z, z_star))
    return tl.where(y == y, z, y)


@triton.jit
def invert(y, left, table_ptr, p0, p1, floor, log_floor, ACT: tl.constexpr,
           NEWTON: tl.constexpr):
    """z with f(z) = y on the branch ``left`` marks (mishkit.backends.inversion.invert)."""
    if ACT == LEAKY_RELU:
        z = tl.where(left, y / p0, y)
    elif ACT == ELU:
        below = _max_of(_log1p(_max_of(y / p0, -1.0)), floor)
        z = tl.where(left & (y == y), below, y)
    elif ACT == SELU:
        u = y / (SELU_SCALE * SELU_ALPHA)
        below = _max_of(_log1p(_max_of(u, -1.0)), floor)
        z = tl.where(left, tl.where(y == y, below, y), y / SELU_SCALE)
    elif ACT == SOFTPLUS:
        below = _max_of(tl.log(_expm1(y * p0)) / p0, floor)
        z = tl.where(left & (y == y), below, y)
    else:
        z = _invert_tabulated(y, left, table_ptr, p0, p1, log_floor, ACT, NEWTON)
    return z


@triton.jit
def _left_bits(mask_ptr, offsets, valid):
    byte = tl.load(mask_ptr + (offsets >> 3), mask=valid, other=0).to(tl.int32)
    return ((byte >> (offsets & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _forward_kernel(x_ptr, r_ptr, mean_ptr, scale_ptr, shift_ptr, consts_ptr, y_ptr, mask_ptr,
                    numel, C, stride_c, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                    BYTES: tl.constexpr, COMPUTE: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES).to(tl.int64)
    bit = tl.arange(0, 8)
    i = byte[:, None] * 8 + bit[None, :]
    valid = i < numel
    c = _channel_of(i, C, stride_c)
    x = tl.load(x_ptr + i, mask=valid, other=0.0).to(COMPUTE)
    z = (x - tl.load(mean_ptr + c, mask=valid)) * tl.load(scale_ptr + c, mask=valid)
    z += tl.load(shift_ptr + c, mask=valid)
    if HAS_RESIDUAL:
        z += tl.load(r_ptr + i, mask=valid, other=0.0).to(COMPUTE)
    y = forward_math(z, tl.load(consts_ptr), tl.load(consts_ptr + 1), ACT)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=valid)
    bits = ((z < tl.load(consts_ptr + 2)) & valid).to(tl.int32) << bit[None, :]
    tl.store(mask_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte * 8 < numel)


@triton.jit
def _recover_z(y, left, table_ptr, consts_ptr, ACT: tl.constexpr, NEWTON: tl.constexpr):
    return invert(y, left, table_ptr, tl.load(consts_ptr), tl.load(consts_ptr + 1),
                  tl.load(consts_ptr + 2), tl.load(consts_ptr + 3), ACT, NEWTON)


@triton.jit
def _dz_xmu(g, z, r, valid, c_shift, c_inv_scale, consts_ptr, HAS_RESIDUAL: tl.constexpr,
            ACT: tl.constexpr):
    """(dz, xmu) of grad_out, the pre-activation z and the residual."""
    u = z - c_shift
    if HAS_RESIDUAL:
        u -= r
    dz = g * derivative_math(z, tl.load(consts_ptr), tl.load(consts_ptr + 1), ACT)
    return tl.where(valid, dz, 0.0), u * c_inv_scale


@triton.jit
def _backward_reduce_kernel(g_ptr, y_ptr, r_ptr, mask_ptr, inv_scale_ptr, shift_ptr, table_ptr,
                            consts_ptr, sum_dz_ptr, sum_dz_xmu_ptr, C, R, S, stride_n, stride_c,
                            stride_s, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                            NEWTON: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            COMPUTE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = c < C
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :]
    inv_scale = tl.load(inv_scale_ptr + c, mask=c_mask, other=0.0)[None, :]
    sum_dz = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    sum_dz_xmu = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    for start in range(0, R, BLOCK_R):
        y, offsets, valid = _rows(y_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s,
                                  BLOCK_R, COMPUTE)
        g = tl.load(g_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
        r = 0.0
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
        z = _recover_z(y, _left_bits(mask_ptr, offsets, valid), table_ptr, consts_ptr, ACT,
                       NEWTON)
        dz, xmu = _dz_xmu(g, z, r, valid, shift, inv_scale, consts_ptr, HAS_RESIDUAL, ACT)
        sum_dz += dz
        sum_dz_xmu += tl.where(valid, dz * xmu, 0.0)
    tl.store(sum_dz_ptr + c, tl.sum(sum_dz, axis=0), mask=c_mask)
    tl.store(sum_dz_xmu_ptr + c, tl.sum(sum_dz_xmu, axis=0), mask=c_mask)


@triton.jit
def _backward_elemt_kernel(g_ptr, y_ptr, r_ptr, mask_ptr, z_ptr, scale_ptr, inv_scale_ptr,
                           shift_ptr, coef_xmu_ptr, coef_const_ptr, table_ptr, consts_ptr,
                           grad_x_ptr, grad_r_ptr, numel, C, stride_c, HAS_RESIDUAL: tl.constexpr,
                           HAS_Z: tl.constexpr, ACT: tl.constexpr, NEWTON: tl.constexpr,
                           BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < numel
    c = _channel_of(i, C, stride_c)
    g = tl.load(g_ptr + i, mask=valid, other=0.0).to(COMPUTE)
    r = 0.0
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + i, mask=valid, other=0.0).to(COMPUTE)
    if HAS_Z:  # the reduce pass's z (a direct call may pass one)
        z = tl.load(z_ptr + i, mask=valid, other=0.0)
    else:
        y = tl.load(y_ptr + i, mask=valid, other=0.0).to(COMPUTE)
        z = _recover_z(y, _left_bits(mask_ptr, i, valid), table_ptr, consts_ptr, ACT, NEWTON)
    dz, xmu = _dz_xmu(g, z, r, valid, tl.load(shift_ptr + c, mask=valid),
                      tl.load(inv_scale_ptr + c, mask=valid), consts_ptr, HAS_RESIDUAL, ACT)
    grad_x = dz * tl.load(scale_ptr + c, mask=valid) + xmu * tl.load(coef_xmu_ptr + c, mask=valid)
    grad_x += tl.load(coef_const_ptr + c, mask=valid)
    tl.store(grad_x_ptr + i, grad_x.to(grad_x_ptr.dtype.element_ty), mask=valid)
    if HAS_RESIDUAL:
        tl.store(grad_r_ptr + i, dz.to(grad_r_ptr.dtype.element_ty), mask=valid)


# -- launch helpers --------------------------------------------------------------------------------


def _consts(values, like: torch.Tensor) -> torch.Tensor:
    """Scalars in the compute dtype, as a tensor (a Python float argument would be float32)."""
    return torch.tensor(list(values), dtype=compute_dtype(like.dtype), device=like.device)


def _params(params) -> list[float]:
    return list(params) + [0.0] * (2 - len(params))


def _activation_id(name: str) -> int:
    return ACTIVATION_IDS[name]


def _newton(y: torch.Tensor) -> int:
    return NEWTON_STEPS[compute_dtype(y.dtype)]


def _geometry(x: torch.Tensor):
    """(C, rows R = N * S, S, stride_n, stride_c, stride_s) of a dense (N, C, *) tensor."""
    channels = x.shape[1]
    spatial = int(torch.Size(x.shape[2:]).numel())
    stride_s = 1 if x.is_contiguous() else channels  # else channels_last (checked by _check)
    return channels, x.shape[0] * spatial, spatial, x.stride(0), x.stride(1), stride_s


def _reduction_blocks(stride_c: int, channels: int) -> tuple[int, int]:
    """(rows, channels) per reduction tile: across channels where they are contiguous."""
    if stride_c == 1:  # channels_last
        return (8 if _INTERPRET else 32), min(triton.next_power_of_2(max(channels, 1)), 64)
    return (32 if _INTERPRET else 256), 1


@triton_op("mishkit::triton_bn_act_output_forward", mutates_args=())
def forward(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            residual: torch.Tensor | None, branch: float, name: str,
            params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    check_bn_tensors("triton_bn_act_output_forward", x, (mean, scale, shift),
                     {"residual": residual})
    y = torch.empty_like(x)
    mask = x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)
    if x.numel() == 0:
        return y, mask
    channels, _, _, _, stride_c, _ = _geometry(x)
    grid = (triton.cdiv(mask.numel(), MASK_BYTES),)
    wrap_triton(_forward_kernel)[grid](
        x, x if residual is None else residual, mean, scale, shift,
        _consts([*_params(params), branch], x), y, mask, x.numel(), channels, stride_c,
        HAS_RESIDUAL=residual is not None, ACT=_activation_id(name), BYTES=MASK_BYTES,
        COMPUTE=_TL_DTYPES[mean.dtype])
    return y, mask


def _backward_consts(name: str, params, y: torch.Tensor) -> torch.Tensor:
    floor, log_floor = saturation_floors(name, tuple(params), y.dtype)
    return _consts([*_params(params), floor, log_floor], y)


def _table_or_dummy(table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return table if table.numel() else y.new_zeros(1, dtype=compute_dtype(y.dtype))


@triton_op("mishkit::triton_bn_act_output_backward_reduce", mutates_args=())
def backward_reduce(grad_out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
                    table: torch.Tensor, name: str,
                    params: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_bn_tensors("triton_bn_act_output_backward_reduce", y, (scale, shift),
                     {"grad_out": grad_out, "residual": residual})
    sum_dz, sum_dz_xmu = torch.empty_like(scale), torch.empty_like(scale)
    channels, rows, spatial, stride_n, stride_c, stride_s = _geometry(y)
    block_r, block_c = _reduction_blocks(stride_c, channels)
    grid = (triton.cdiv(channels, block_c),)
    wrap_triton(_backward_reduce_kernel)[grid](
        grad_out, y, y if residual is None else residual, mask, 1.0 / scale, shift,
        _table_or_dummy(table, y), _backward_consts(name, params, y), sum_dz, sum_dz_xmu,
        channels, rows, spatial, stride_n, stride_c, stride_s,
        HAS_RESIDUAL=residual is not None, ACT=_activation_id(name), NEWTON=_newton(y),
        BLOCK_R=block_r, BLOCK_C=block_c, COMPUTE=_TL_DTYPES[scale.dtype])
    # no z for backward_elemt: recovering it again costs less than its memory traffic on a GPU
    return sum_dz, sum_dz_xmu, scale.new_empty(0)


@triton_op("mishkit::triton_bn_act_output_backward_elemt", mutates_args=())
def backward_elemt(grad_out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, z: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
                   coef_xmu: torch.Tensor, coef_const: torch.Tensor, table: torch.Tensor,
                   name: str, params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    has_z = z.numel() > 0
    check_bn_tensors("triton_bn_act_output_backward_elemt", y,
                     (scale, shift, coef_xmu, coef_const),
                     {"grad_out": grad_out, "residual": residual, "z": z if has_z else None})
    torch._check(not has_z or z.dtype == scale.dtype, lambda: "z must be in the compute dtype")
    grad_x = torch.empty_like(y)
    grad_r = torch.empty_like(y) if residual is not None else y.new_empty(0)
    if y.numel() == 0:
        return grad_x, grad_r
    channels, _, _, _, stride_c, _ = _geometry(y)
    grid = (triton.cdiv(y.numel(), BLOCK),)
    wrap_triton(_backward_elemt_kernel)[grid](
        grad_out, y, y if residual is None else residual, mask, z if has_z else scale, scale,
        1.0 / scale, shift, coef_xmu, coef_const, _table_or_dummy(table, y),
        _backward_consts(name, params, y), grad_x, grad_x if residual is None else grad_r,
        y.numel(), channels, stride_c, HAS_RESIDUAL=residual is not None, HAS_Z=has_z,
        ACT=_activation_id(name), NEWTON=_newton(y), BLOCK=BLOCK, COMPUTE=_TL_DTYPES[scale.dtype])
    return grad_x, grad_r


KERNELS = BnActOutputKernels(forward, backward_reduce, backward_elemt)
