"""Triton kernels for fused BatchNorm + activation (the contract: :mod:`mishkit.batchnorm`).

Registered as ``torch.ops.mishkit.triton_bn_act_{stats,forward,backward_reduce,backward_elemt}``.
``x`` is ``(N, C, *)`` and dense: NCHW-contiguous, or channels-last (channels innermost:
``channels_last`` 4-D, ``channels_last_3d`` 5-D), indexed directly (no copies). Either way the
storage is a row-major ``[outer, inner]`` matrix:

* NCHW: ``outer`` = the N * C planes, ``inner`` = the S spatial positions; channel = plane % C,
  computed once per tile row, never per element.
* channels-last: ``outer`` = the N * S positions, ``inner`` = the C channels.

Elementwise passes (forward, input gradient) run one ``[BLOCK_O, BLOCK_I]`` tile per program and
load each per-channel value once per tile row or column. Reductions (statistics, backward sums)
split the rows of every channel over enough programs to fill the GPU (:func:`programs_to_fill`):
each program writes its partial result to a float64 workspace, and one small kernel combines the
partials per channel in a fixed order (deterministic, no atomics). The statistics are single-pass:
each tile's mean and centred sum of squares are merged into the running ones (Chan et al.'s
pairwise Welford update), so the variance never suffers the cancellation of ``E[x²] - E[x]²``.

Activation parameters are scalar kernel arguments (:func:`.kernel_io.split_params`): no tensor is
built on the host per call. Formulas come from :mod:`.math`. Runs on CUDA, or on CPU tensors with
``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._checks import BnActKernels, compute_dtype
from ...registry import get_spec
from . import interpret_mode
from .kernel_io import check_bn_tensors, narrow, param, programs_to_fill, split_params, widen
from .math import ACTIVATION_IDS, derivative_math, forward_math

# The CPU interpreter runs each program in numpy: small tiles keep the tiny test tensors fast.
_INTERPRET = interpret_mode()
TILE_ELEMENTS = 64 if _INTERPRET else 2048  # elements of one [BLOCK_O, BLOCK_I] tile
MAX_BLOCK_I = 32 if _INTERPRET else 1024


@triton.jit
def _tile_offsets(o0, i0, outer, inner, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Rows ``o0 ..`` and columns ``i0 ..`` of the [outer, inner] storage: offsets, mask, rows."""
    o = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
    i = i0 + tl.arange(0, BLOCK_I)
    offsets = o[:, None] * inner + i[None, :]
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    return offsets, mask, o, i


@triton.jit
def _channel_values(ptr, o, i, C, CHANNELS_LAST: tl.constexpr):
    """Per-channel values for a tile: a [1, BLOCK_I] row (channels-last) or a [BLOCK_O, 1]
    column (NCHW: channel = plane % C, one division per tile row)."""
    if CHANNELS_LAST:
        out = tl.load(ptr + i, mask=i < C, other=0.0)[None, :]
    else:
        out = tl.load(ptr + o % C)[:, None]  # o % C < C for every row, valid or not
    return out


# -- elementwise ------------------------------------------------------------------------------


@triton.jit
def _elementwise_tile(x_ptr, mean_ptr, scale_ptr, shift_ptr, outer, inner, C, tiles_i,
                      CHANNELS_LAST: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: offsets, mask, row and column ids, x - mean and z = x̂ γ + β."""
    pid = tl.program_id(0)
    offsets, mask, o, i = _tile_offsets((pid // tiles_i).to(tl.int64) * BLOCK_O,
                                        (pid % tiles_i) * BLOCK_I, outer, inner, BLOCK_O, BLOCK_I)
    mean = _channel_values(mean_ptr, o, i, C, CHANNELS_LAST)
    scale = _channel_values(scale_ptr, o, i, C, CHANNELS_LAST)
    shift = _channel_values(shift_ptr, o, i, C, CHANNELS_LAST)
    xmu = widen(tl.load(x_ptr + offsets, mask=mask, other=0.0)).to(mean.dtype) - mean
    return offsets, mask, o, i, xmu, scale, xmu * scale + shift


@triton.jit
def _forward_kernel(x_ptr, mean_ptr, scale_ptr, shift_ptr, y_ptr, outer, inner, C, tiles_i,
                    p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    offsets, mask, _, _, _, _, z = _elementwise_tile(x_ptr, mean_ptr, scale_ptr, shift_ptr,
                                                     outer, inner, C, tiles_i, CHANNELS_LAST,
                                                     BLOCK_O, BLOCK_I)
    y = forward_math(z, param(p0_hi, p0_lo, z), param(p1_hi, p1_lo, z), ACT)
    tl.store(y_ptr + offsets, narrow(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_elemt_kernel(g_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, coef_xmu_ptr,
                           coef_const_ptr, grad_x_ptr, outer, inner, C, tiles_i,
                           p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_I: tl.constexpr):
    offsets, mask, o, i, xmu, scale, z = _elementwise_tile(x_ptr, mean_ptr, scale_ptr,
                                                           shift_ptr, outer, inner, C, tiles_i,
                                                           CHANNELS_LAST, BLOCK_O, BLOCK_I)
    g = widen(tl.load(g_ptr + offsets, mask=mask, other=0.0)).to(xmu.dtype)
    dz = g * derivative_math(z, param(p0_hi, p0_lo, z), param(p1_hi, p1_lo, z), ACT)
    grad_x = dz * scale + xmu * _channel_values(coef_xmu_ptr, o, i, C, CHANNELS_LAST)
    grad_x += _channel_values(coef_const_ptr, o, i, C, CHANNELS_LAST)
    tl.store(grad_x_ptr + offsets, narrow(grad_x, grad_x_ptr.dtype.element_ty), mask=mask)


# -- reductions -------------------------------------------------------------------------------
# Program (channel unit u, chunk k). NCHW: u is channel c, its elements are the N planes
# n * C + c, walked as [BLOCK_O batch rows, BLOCK_I positions] tiles (tile t = batch block
# t // tiles_i, position block t % tiles_i); channels-last: u is a block of BLOCK_I channels, its
# elements the rows, walked as [BLOCK_O rows, BLOCK_I channels] tiles. Chunk k takes tiles
# [k * tiles_per_chunk, (k + 1) * tiles_per_chunk).


@triton.jit
def _reduction_tile(t, u, outer, S, C, tiles_i, CHANNELS_LAST: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets, mask and element count of tile ``t`` of channel unit ``u``. ``outer``: the rows
    N * S (channels-last) or the batch N (NCHW)."""
    if CHANNELS_LAST:
        o0 = tl.cast(t, tl.int64) * BLOCK_O  # tl.cast: t is a Python int when interpreted
        offsets, mask, _, _ = _tile_offsets(o0, u * BLOCK_I, outer, C, BLOCK_O, BLOCK_I)
        count = tl.minimum(outer - o0, BLOCK_O)
    else:
        n0 = tl.cast(t // tiles_i, tl.int64) * BLOCK_O
        s0 = (t % tiles_i) * BLOCK_I
        n = n0 + tl.arange(0, BLOCK_O).to(tl.int64)
        s = s0 + tl.arange(0, BLOCK_I)
        offsets = (n * C + u)[:, None] * S + s[None, :]
        mask = (n < outer)[:, None] & (s < S)[None, :]
        count = tl.minimum(outer - n0, BLOCK_O) * tl.minimum(S - s0, BLOCK_I)
    return offsets, mask, count


@triton.jit
def _channel_sum(v, CHANNELS_LAST: tl.constexpr):
    """Per-channel sums of a tile: over its rows (channels-last: [BLOCK_I]), over all of it
    (NCHW, one channel: [1])."""
    if CHANNELS_LAST:
        out = tl.sum(v, axis=0)
    else:
        out = tl.sum(tl.sum(v, axis=1), axis=0, keep_dims=True)
    return out


@triton.jit
def _unit_channels(u, C, CHANNELS_LAST: tl.constexpr, WIDTH: tl.constexpr):
    """The channel ids of unit ``u`` ([WIDTH]: BLOCK_I channels, or the one NCHW channel)."""
    if CHANNELS_LAST:
        channel = u * WIDTH + tl.arange(0, WIDTH)
    else:
        channel = u + tl.arange(0, WIDTH)
    return channel


@triton.jit
def _stats_partial_kernel(x_ptr, partial_ptr, outer, S, C, tiles, tiles_i, tiles_per_chunk,
                          chunks, CHANNELS_LAST: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_I: tl.constexpr, WIDTH: tl.constexpr, COMPUTE: tl.constexpr):
    u = tl.program_id(0)
    k = tl.program_id(1)
    channel = _unit_channels(u, C, CHANNELS_LAST, WIDTH)
    store = channel < C
    # Statistics of x - shift, shift = the channel's first element: a tile sum of values near
    # 1e4 would carry float32 errors as large as a small standard deviation; of x - shift not.
    if CHANNELS_LAST:
        first = channel
    else:
        first = channel * S
    has_elements = tl.full([WIDTH], tiles, tl.int32) > 0
    shift = widen(tl.load(x_ptr + first, mask=store & has_elements, other=0.0)).to(COMPUTE)
    count = tl.zeros([WIDTH], tl.float64)
    mean = tl.zeros([WIDTH], COMPUTE)
    m2 = tl.zeros([WIDTH], COMPUTE)
    for t in range(k * tiles_per_chunk, tl.minimum((k + 1) * tiles_per_chunk, tiles)):
        offsets, mask, tile_count = _reduction_tile(t, u, outer, S, C, tiles_i, CHANNELS_LAST,
                                                    BLOCK_O, BLOCK_I)
        x = widen(tl.load(x_ptr + offsets, mask=mask, other=0.0)).to(COMPUTE)
        x = tl.where(mask, x - shift, 0.0)
        tile_mean = _channel_sum(x, CHANNELS_LAST) / tile_count.to(COMPUTE)
        centred = tl.where(mask, x - tile_mean, 0.0)  # [WIDTH] broadcasts along the rows
        tile_m2 = _channel_sum(centred * centred, CHANNELS_LAST)
        # merge the running (count, mean, m2) with the tile's: the pairwise Welford update
        total = count + tile_count.to(tl.float64)
        weight = (tile_count.to(tl.float64) / total).to(COMPUTE)
        delta = tile_mean - mean
        mean += delta * weight
        m2 += tile_m2 + delta * delta * count.to(COMPUTE) * weight
        count = total
    base = partial_ptr + k * C + channel
    tl.store(base, count, mask=store)
    tl.store(base + chunks * C, shift.to(tl.float64) + mean.to(tl.float64), mask=store)
    tl.store(base + 2 * chunks * C, m2.to(tl.float64), mask=store)


@triton.jit
def _stats_combine_kernel(partial_ptr, mean_ptr, var_ptr, C, chunks, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < C
    count = tl.zeros([BLOCK_C], tl.float64)
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for k in range(0, chunks):  # fixed order: the result does not depend on timing
        base = partial_ptr + k * C + c
        part_count = tl.load(base, mask=valid, other=0.0)
        part_mean = tl.load(base + chunks * C, mask=valid, other=0.0)
        part_m2 = tl.load(base + 2 * chunks * C, mask=valid, other=0.0)
        total = count + part_count
        weight = tl.where(total > 0, part_count / tl.where(total > 0, total, 1.0), 0.0)
        delta = part_mean - mean
        mean += delta * weight
        m2 += part_m2 + delta * delta * count * weight
        count = total
    # an empty batch gives 0 / 0 = nan, as torch's batch_norm statistics do
    tl.store(mean_ptr + c, tl.where(count > 0, mean, mean / count).to(mean_ptr.dtype.element_ty),
             mask=valid)
    tl.store(var_ptr + c, (m2 / count).to(var_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _backward_partial_kernel(g_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, partial_ptr,
                             outer, S, C, tiles, tiles_i, tiles_per_chunk, chunks,
                             p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr, BLOCK_O: tl.constexpr,
                             BLOCK_I: tl.constexpr, WIDTH: tl.constexpr):
    u = tl.program_id(0)
    k = tl.program_id(1)
    channel = _unit_channels(u, C, CHANNELS_LAST, WIDTH)
    valid = channel < C
    mean = tl.load(mean_ptr + channel, mask=valid, other=0.0)  # [WIDTH]: broadcasts over rows
    scale = tl.load(scale_ptr + channel, mask=valid, other=0.0)
    shift = tl.load(shift_ptr + channel, mask=valid, other=0.0)
    sum_dz = tl.zeros([BLOCK_O, BLOCK_I], mean.dtype)
    sum_dz_xmu = tl.zeros([BLOCK_O, BLOCK_I], mean.dtype)
    for t in range(k * tiles_per_chunk, tl.minimum((k + 1) * tiles_per_chunk, tiles)):
        offsets, mask, _ = _reduction_tile(t, u, outer, S, C, tiles_i, CHANNELS_LAST, BLOCK_O,
                                           BLOCK_I)
        x = widen(tl.load(x_ptr + offsets, mask=mask, other=0.0)).to(mean.dtype)
        g = widen(tl.load(g_ptr + offsets, mask=mask, other=0.0)).to(mean.dtype)
        xmu = x - mean
        z = xmu * scale + shift
        dz = g * derivative_math(z, param(p0_hi, p0_lo, z), param(p1_hi, p1_lo, z), ACT)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += dz
        sum_dz_xmu += dz * xmu
    base = partial_ptr + k * C + channel
    tl.store(base, _channel_sum(sum_dz, CHANNELS_LAST).to(tl.float64), mask=valid)
    tl.store(base + chunks * C, _channel_sum(sum_dz_xmu, CHANNELS_LAST).to(tl.float64),
             mask=valid)


@triton.jit
def _sum_combine_kernel(partial_ptr, first_ptr, second_ptr, C, chunks, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = c < C
    first = tl.zeros([BLOCK_C], tl.float64)
    second = tl.zeros([BLOCK_C], tl.float64)
    for k in range(0, chunks):  # fixed order: deterministic
        first += tl.load(partial_ptr + k * C + c, mask=valid, other=0.0)
        second += tl.load(partial_ptr + (chunks + k) * C + c, mask=valid, other=0.0)
    tl.store(first_ptr + c, first.to(first_ptr.dtype.element_ty), mask=valid)
    tl.store(second_ptr + c, second.to(second_ptr.dtype.element_ty), mask=valid)


# -- launch geometry ----------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
COMBINE_BLOCK = 32 if _INTERPRET else 256


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous()  # _check admits only contiguous or channels-last


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    """(N, C, S) of an (N, C, *) tensor, S the product of the spatial sizes."""
    return x.shape[0], x.shape[1], int(torch.Size(x.shape[2:]).numel())


def _tile(inner: int) -> tuple[int, int]:
    """(BLOCK_O, BLOCK_I) of a tile along an inner extent ``inner``: TILE_ELEMENTS elements."""
    block_i = min(triton.next_power_of_2(max(inner, 1)), MAX_BLOCK_I)
    return max(TILE_ELEMENTS // block_i, 1), block_i


def _warps(tile_elements: int, itemsize: int) -> int:
    """Warps for a tile: 32 bytes of input per thread (e.g. 8 float32, 16 bfloat16), at most 8."""
    return max(1, min(8, tile_elements * itemsize // (32 * 32)))


def _elementwise(kernel, x: torch.Tensor, tensors: tuple, split: list[float], act: int):
    n, c, s = _sizes(x)
    channels_last = _channels_last(x)
    outer, inner = (n * s, c) if channels_last else (n * c, s)
    block_o, block_i = _tile(inner)
    tiles_i = triton.cdiv(inner, block_i)
    grid = (triton.cdiv(outer, block_o) * tiles_i,)
    wrap_triton(kernel)[grid](*tensors, outer, inner, c, tiles_i, *split, ACT=act,
                              CHANNELS_LAST=channels_last, BLOCK_O=block_o, BLOCK_I=block_i,
                              num_warps=_warps(block_o * block_i, x.element_size()))


def _reduction_plan(x: torch.Tensor) -> dict:
    """Tiles, chunks and the (units, chunks) grid of a reduction over ``x``'s channels."""
    n, c, s = _sizes(x)
    channels_last = _channels_last(x)
    block_o, block_i = _tile(c if channels_last else s)
    if channels_last:
        outer, tiles_i = n * s, 1
        units, tiles = triton.cdiv(c, block_i), triton.cdiv(n * s, block_o)
    else:
        outer, tiles_i = n, triton.cdiv(s, block_i)
        units, tiles = c, triton.cdiv(n, block_o) * tiles_i
    wanted = triton.cdiv(programs_to_fill(x.device), max(units, 1))
    chunks = max(1, min(wanted, tiles))
    per_chunk = triton.cdiv(tiles, chunks) if tiles else 0
    return {"args": (outer, s, c, tiles, tiles_i, per_chunk, chunks), "chunks": chunks,
            "grid": (units, chunks),
            "meta": {"CHANNELS_LAST": channels_last, "BLOCK_O": block_o, "BLOCK_I": block_i,
                     "WIDTH": block_i if channels_last else 1,
                     "num_warps": _warps(block_o * block_i, x.element_size())}}


def _activation(op: str, name: str, params) -> tuple[int, list[float]]:
    spec = get_spec(name)
    return ACTIVATION_IDS[spec.name], split_params(op, spec, params)


# -- the ops ------------------------------------------------------------------------------------


@triton_op("mishkit::triton_bn_act_stats", mutates_args=())
def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_bn_tensors("triton_bn_act_stats", x)
    compute = compute_dtype(x.dtype)
    mean = x.new_empty(x.shape[1], dtype=compute)
    var = torch.empty_like(mean)
    if x.shape[1] == 0:
        return mean, var
    plan = _reduction_plan(x)
    partial = x.new_empty((3, plan["chunks"], x.shape[1]), dtype=torch.float64)
    wrap_triton(_stats_partial_kernel)[plan["grid"]](x, partial, *plan["args"],
                                                     COMPUTE=_TL_DTYPES[compute], **plan["meta"])
    wrap_triton(_stats_combine_kernel)[(triton.cdiv(x.shape[1], COMBINE_BLOCK),)](
        partial, mean, var, x.shape[1], plan["chunks"], BLOCK_C=COMBINE_BLOCK)
    return mean, var


@triton_op("mishkit::triton_bn_act_forward", mutates_args=())
def forward(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            name: str, params: list[float]) -> torch.Tensor:
    check_bn_tensors("triton_bn_act_forward", x, (mean, scale, shift))
    act, split = _activation("triton_bn_act_forward", name, params)
    y = torch.empty_like(x)
    if x.numel() > 0:
        _elementwise(_forward_kernel, x, (x, mean, scale, shift, y), split, act)
    return y


@triton_op("mishkit::triton_bn_act_backward_reduce", mutates_args=())
def backward_reduce(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor, name: str,
                    params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    check_bn_tensors("triton_bn_act_backward_reduce", x, (mean, scale, shift),
                     {"grad_out": grad_out})
    act, split = _activation("triton_bn_act_backward_reduce", name, params)
    sum_dz, sum_dz_xmu = torch.empty_like(mean), torch.empty_like(mean)
    if x.shape[1] == 0:
        return sum_dz, sum_dz_xmu
    plan = _reduction_plan(x)
    partial = x.new_empty((2, plan["chunks"], x.shape[1]), dtype=torch.float64)
    wrap_triton(_backward_partial_kernel)[plan["grid"]](
        grad_out, x, mean, scale, shift, partial, *plan["args"], *split, ACT=act,
        **plan["meta"])
    wrap_triton(_sum_combine_kernel)[(triton.cdiv(x.shape[1], COMBINE_BLOCK),)](
        partial, sum_dz, sum_dz_xmu, x.shape[1], plan["chunks"], BLOCK_C=COMBINE_BLOCK)
    return sum_dz, sum_dz_xmu


@triton_op("mishkit::triton_bn_act_backward_elemt", mutates_args=())
def backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, coef_xmu: torch.Tensor,
                   coef_const: torch.Tensor, name: str, params: list[float]) -> torch.Tensor:
    check_bn_tensors("triton_bn_act_backward_elemt", x,
                     (mean, scale, shift, coef_xmu, coef_const), {"grad_out": grad_out})
    act, split = _activation("triton_bn_act_backward_elemt", name, params)
    grad_x = torch.empty_like(x)
    if x.numel() > 0:
        _elementwise(_backward_elemt_kernel, x,
                     (grad_out, x, mean, scale, shift, coef_xmu, coef_const, grad_x), split, act)
    return grad_x


KERNELS = BnActKernels(stats, forward, backward_reduce, backward_elemt)
