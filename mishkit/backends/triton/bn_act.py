"""Triton kernels for fused BatchNorm + activation (the contract: :mod:`mishkit.batchnorm`).

Registered as ``torch.ops.mishkit.triton_bn_act_{stats,forward,backward_reduce,backward_elemt}``.
``x`` is ``(N, C, *)`` and dense: NCHW-contiguous or channels_last, indexed directly (no copies).
Element ``(n, c, s)`` of the flattened spatial index ``s`` lives at
``n * stride_n + c * stride_c + s * stride_s``.

* Reductions (statistics, backward sums): one program per block of channels walks all ``N * S``
  rows in ``[rows, channels]`` tiles, accumulating in the compute dtype (float32 for half inputs,
  float64 for float64). The variance is two-pass (mean first, then squared deviations).
* Elementwise passes (forward, input gradient) run over the flat storage; the channel of flat
  index ``i`` is ``(i // stride_c) % C``.

Activation formulas come from :mod:`.math`. Runs on CUDA, or on CPU tensors with
``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._checks import BnActKernels, compute_dtype
from . import interpret_mode
from .math import ACTIVATION_IDS, derivative_math, forward_math

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# The CPU interpreter runs each program in numpy: small tiles keep the tiny test tensors fast.
_INTERPRET = interpret_mode()
ELEMENTWISE_BLOCK = 64 if _INTERPRET else 1024


@triton.jit
def _tile(x_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s, BLOCK_R: tl.constexpr,
          COMPUTE: tl.constexpr):
    """Rows ``start .. start + BLOCK_R`` of channels ``c``, as a [BLOCK_R, BLOCK_C] tile."""
    r = start + tl.arange(0, BLOCK_R).to(tl.int64)
    row_offset = (r // S) * stride_n + (r % S) * stride_s
    mask = (r < R)[:, None] & c_mask[None, :]
    offsets = row_offset[:, None] + c[None, :] * stride_c
    return tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE), offsets, mask


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, var_ptr, C, R, S, stride_n, stride_c, stride_s,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = c < C
    total = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    for start in range(0, R, BLOCK_R):
        x, _, _ = _tile(x_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s, BLOCK_R,
                        COMPUTE)
        total += x
    mean = tl.sum(total, axis=0) / R
    squares = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    for start in range(0, R, BLOCK_R):
        x, _, mask = _tile(x_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s, BLOCK_R,
                           COMPUTE)
        deviation = tl.where(mask, x - mean[None, :], 0.0)
        squares += deviation * deviation
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, tl.sum(squares, axis=0) / R, mask=c_mask)


@triton.jit
def _backward_reduce_kernel(g_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, params_ptr,
                            sum_dz_ptr, sum_dz_xmu_ptr, C, R, S, stride_n, stride_c, stride_s,
                            ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            COMPUTE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)[None, :]
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :]
    p0 = tl.load(params_ptr)
    p1 = tl.load(params_ptr + 1)
    sum_dz = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    sum_dz_xmu = tl.zeros([BLOCK_R, BLOCK_C], COMPUTE)
    for start in range(0, R, BLOCK_R):
        x, offsets, mask = _tile(x_ptr, start, c, c_mask, R, S, stride_n, stride_c, stride_s,
                                 BLOCK_R, COMPUTE)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        xmu = x - mean
        dz = g * derivative_math(xmu * scale + shift, p0, p1, ACT)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += dz
        sum_dz_xmu += dz * xmu
    tl.store(sum_dz_ptr + c, tl.sum(sum_dz, axis=0), mask=c_mask)
    tl.store(sum_dz_xmu_ptr + c, tl.sum(sum_dz_xmu, axis=0), mask=c_mask)


@triton.jit
def _channel_of(i, C, stride_c):
    return (i // stride_c) % C


@triton.jit
def _forward_kernel(x_ptr, mean_ptr, scale_ptr, shift_ptr, params_ptr, y_ptr, numel, C, stride_c,
                    ACT: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = _channel_of(i, C, stride_c)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(COMPUTE)
    z = (x - tl.load(mean_ptr + c, mask=mask)) * tl.load(scale_ptr + c, mask=mask)
    z += tl.load(shift_ptr + c, mask=mask)
    y = forward_math(z, tl.load(params_ptr), tl.load(params_ptr + 1), ACT)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_elemt_kernel(g_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, coef_xmu_ptr,
                           coef_const_ptr, params_ptr, grad_x_ptr, numel, C, stride_c,
                           ACT: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = _channel_of(i, C, stride_c)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(COMPUTE)
    scale = tl.load(scale_ptr + c, mask=mask)
    xmu = x - tl.load(mean_ptr + c, mask=mask)
    z = xmu * scale + tl.load(shift_ptr + c, mask=mask)
    dz = g * derivative_math(z, tl.load(params_ptr), tl.load(params_ptr + 1), ACT)
    grad_x = dz * scale + xmu * tl.load(coef_xmu_ptr + c, mask=mask)
    grad_x += tl.load(coef_const_ptr + c, mask=mask)
    tl.store(grad_x_ptr + i, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


# -- launch helpers --------------------------------------------------------------------------------


def _geometry(x: torch.Tensor):
    """(C, rows R = N * S, S, stride_n, stride_c, stride_s) of a dense (N, C, *) tensor."""
    channels = x.shape[1]
    spatial = int(torch.Size(x.shape[2:]).numel())
    stride_s = 1 if x.is_contiguous() else channels  # else channels_last (checked by _check)
    return channels, x.shape[0] * spatial, spatial, x.stride(0), x.stride(1), stride_s


def _reduction_blocks(stride_c: int, channels: int) -> tuple[int, int]:
    if stride_c == 1:  # channels_last: channels are contiguous, tile across them
        return (8 if _INTERPRET else 32), min(triton.next_power_of_2(max(channels, 1)), 64)
    return (32 if _INTERPRET else 256), 1


def _activation(name: str, params, like: torch.Tensor):
    params = list(params) + [0.0] * (2 - len(params))
    compute = compute_dtype(like.dtype)
    return ACTIVATION_IDS[name], torch.tensor(params, dtype=compute, device=like.device)


def _check(x: torch.Tensor, *vectors: torch.Tensor) -> None:
    torch._check(x.dim() >= 2, lambda: f"expected an (N, C, ...) tensor, got {list(x.shape)}")
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    dense = x.is_contiguous() or channels_last
    torch._check(dense, lambda: "x must be contiguous or channels_last (batch_norm_act makes it)")
    for v in vectors:
        torch._check(v.shape == (x.shape[1],) and v.dtype == compute_dtype(x.dtype),
                     lambda: "per-channel vectors must be (C,) in the compute dtype")


@triton_op("mishkit::triton_bn_act_stats", mutates_args=())
def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    compute = compute_dtype(x.dtype)
    mean = x.new_empty(x.shape[1], dtype=compute)
    var = torch.empty_like(mean)
    channels, rows, spatial, stride_n, stride_c, stride_s = _geometry(x)
    block_r, block_c = _reduction_blocks(stride_c, channels)
    grid = (triton.cdiv(channels, block_c),)
    wrap_triton(_stats_kernel)[grid](x, mean, var, channels, rows, spatial, stride_n, stride_c,
                                     stride_s, BLOCK_R=block_r, BLOCK_C=block_c,
                                     COMPUTE=_TL_DTYPES[compute])
    return mean, var


@triton_op("mishkit::triton_bn_act_forward", mutates_args=())
def forward(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            name: str, params: list[float]) -> torch.Tensor:
    _check(x, mean, scale, shift)
    act, params_tensor = _activation(name, params, x)
    y = torch.empty_like(x)
    channels, _, _, _, stride_c, _ = _geometry(x)
    grid = (triton.cdiv(x.numel(), ELEMENTWISE_BLOCK),)
    if x.numel() == 0:
        return y
    wrap_triton(_forward_kernel)[grid](x, mean, scale, shift, params_tensor, y, x.numel(),
                                       channels, stride_c, ACT=act, BLOCK=ELEMENTWISE_BLOCK,
                                       COMPUTE=_TL_DTYPES[mean.dtype])
    return y


@triton_op("mishkit::triton_bn_act_backward_reduce", mutates_args=())
def backward_reduce(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor, name: str,
                    params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, mean, scale, shift)
    torch._check(grad_out.stride() == x.stride(), lambda: "grad_out must have x's strides")
    act, params_tensor = _activation(name, params, x)
    sum_dz, sum_dz_xmu = torch.empty_like(mean), torch.empty_like(mean)
    channels, rows, spatial, stride_n, stride_c, stride_s = _geometry(x)
    block_r, block_c = _reduction_blocks(stride_c, channels)
    grid = (triton.cdiv(channels, block_c),)
    wrap_triton(_backward_reduce_kernel)[grid](
        grad_out, x, mean, scale, shift, params_tensor, sum_dz, sum_dz_xmu, channels, rows,
        spatial, stride_n, stride_c, stride_s, ACT=act, BLOCK_R=block_r, BLOCK_C=block_c,
        COMPUTE=_TL_DTYPES[mean.dtype],
    )
    return sum_dz, sum_dz_xmu


@triton_op("mishkit::triton_bn_act_backward_elemt", mutates_args=())
def backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, coef_xmu: torch.Tensor,
                   coef_const: torch.Tensor, name: str, params: list[float]) -> torch.Tensor:
    _check(x, mean, scale, shift, coef_xmu, coef_const)
    torch._check(grad_out.stride() == x.stride(), lambda: "grad_out must have x's strides")
    act, params_tensor = _activation(name, params, x)
    grad_x = torch.empty_like(x)
    channels, _, _, _, stride_c, _ = _geometry(x)
    grid = (triton.cdiv(x.numel(), ELEMENTWISE_BLOCK),)
    if x.numel() == 0:
        return grad_x
    wrap_triton(_backward_elemt_kernel)[grid](
        grad_out, x, mean, scale, shift, coef_xmu, coef_const, params_tensor, grad_x, x.numel(),
        channels, stride_c, ACT=act, BLOCK=ELEMENTWISE_BLOCK, COMPUTE=_TL_DTYPES[mean.dtype],
    )
    return grad_x


KERNELS = BnActKernels(stats, forward, backward_reduce, backward_elemt)
