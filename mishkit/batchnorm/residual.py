"""Fused ``act(batch_norm(x) + residual)``: the end of a ResNet block, saving no sum.

Unfused, a smooth activation after ``bn(x) + residual`` saves that sum (a full-size tensor) for
backward. :class:`BatchNormAddActFunction` saves only ``x``, ``residual`` and four ``(C,)``
vectors; the residual is usually the block's input, which the block's first convolution saves
anyway, so autograd holds one storage for both. Backward recomputes
``z = x̂ γ + β + residual``, takes ``g' = g · act'(z)`` from the backend's activation backward op,
and then runs plain BatchNorm's backward from ``g'`` (``grad_residual = g'``).

"Plain BatchNorm" is the backend's fused BN+act kernels with the identity activation, spelled
``leaky_relu`` with slope 1 (whose derivative is exactly 1): the statistics, the cross-process
reduction and the gradient formulas stay the ones of :mod:`.autograd`.
"""

from __future__ import annotations

import torch

from .. import backends, ops
from .._checks import dense_format
from ..registry import get_spec
from .autograd import (
    IDENTITY,
    batch_norm_act_gradients,
    normalization,
    parameter_dtypes,
    reject_double_backward,
)


def check_residual(residual, x: torch.Tensor, op: str) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(
            f"mishkit.{op}: residual must be a torch.Tensor, got {type(residual).__name__}"
        )
    if (residual.shape, residual.dtype, residual.device) != (x.shape, x.dtype, x.device):
        raise ValueError(
            f"mishkit.{op}: residual must match the input (shape {list(x.shape)}, {x.dtype}, "
            f"{x.device}), got shape {list(residual.shape)}, {residual.dtype}, {residual.device}"
        )


def _pre_activation(kernels, x, residual, mean, scale, shift) -> torch.Tensor:
    """``z = (x - mean) * scale + shift + residual`` as one new tensor in x's layout."""
    z = kernels.forward(x, mean, scale, shift, IDENTITY[0], IDENTITY[1])
    return z.add_(residual)


class BatchNormAddActFunction(torch.autograd.Function):
    """act(batch_norm(x) + residual); saves ``x``, ``residual`` and four ``(C,)`` vectors.

    Not twice differentiable: differentiating its gradients raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, use_batch_stats,
                momentum, eps, name, params, backend, process_group):
        kernels = backends.kernels(backend).bn_act
        mean, invstd, scale, shift, count = normalization(
            kernels, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
            process_group)
        y = _pre_activation(kernels, x, residual, mean, scale, shift)
        ops.apply(y, get_spec(name), tuple(params), True, backend)  # in place: y is z's buffer
        ctx.save_for_backward(x, residual, mean, invstd, scale, shift)
        ctx.setup = (use_batch_stats, count, name, list(params), backend, process_group)
        ctx.param_dtypes = parameter_dtypes(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, residual, *statistics = ctx.saved_tensors
        mean, _, scale, shift = statistics
        use_batch_stats, count, name, params, backend, group = ctx.setup
        need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        with torch.no_grad():
            z = _pre_activation(backends.kernels(backend).bn_act, x, residual, mean, scale, shift)
            grad_out = grad_out.contiguous(memory_format=dense_format(z))
            grad_z = ops.backward(grad_out, z, name, params, backend)
            del z
            grad_x, grad_weight, grad_bias = batch_norm_act_gradients(
                grad_z, x, statistics, (use_batch_stats, count, *IDENTITY, backend, group),
                (need_x, need_weight, need_bias), ctx.param_dtypes)
        grads = (grad_x, grad_z if need_residual else None, grad_weight, grad_bias)
        return *reject_double_backward(x, grads), *([None] * 9)
