"""The autograd of fused BatchNorm + activation, shared by every backend's kernels.

:class:`BatchNormActFunction` composes a backend's four kernels (see :mod:`mishkit.batchnorm`)
and saves ``x`` plus four ``(C,)`` vectors only; ``z = x̂ γ + β`` is recomputed in backward. The
cross-process reduction of SyncBatchNormAct2d happens here, between kernel calls. Double backward
is not supported: differentiating the gradients raises.

On CPU, backward evaluates ``act'(z)`` once: the reduce pass stores ``dz = grad_out · act'(z)``
and the elementwise pass reads it with the identity activation. CPU kernels are compute-bound on
a smooth activation's derivative (one exp and two divisions per element for Mish, more than
writing and reading back one value), so computing it in both passes made the fused backward
cost as much as BatchNorm2d + the activation. GPUs are memory-bound: they recompute it.
"""

from __future__ import annotations

import torch

from .. import backends
from .._checks import BnActKernels, compute_dtype, match_layout
from ..registry import get_spec
from .distributed import all_reduce_sum, sync_stats

# leaky_relu(z, 1) == z with derivative exactly 1: the BN+act kernels then compute plain BN.
IDENTITY = ("leaky_relu", [1.0])


class BatchNormActFunction(torch.autograd.Function):
    """act(batch_norm(x)) with any backend's kernels; saves ``x`` + four ``(C,)`` vectors.

    Not twice differentiable: differentiating its gradients raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                name, params, backend, process_group):
        kernels = backends.kernels(backend).bn_act
        mean, invstd, scale, shift, count = normalization(
            kernels, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
            process_group)
        y = kernels.forward(x, mean, scale, shift, name, list(params))
        ctx.save_for_backward(x, mean, invstd, scale, shift)
        ctx.setup = (use_batch_stats, count, name, list(params), backend, process_group)
        ctx.param_dtypes = parameter_dtypes(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, *statistics = ctx.saved_tensors
        with torch.no_grad():
            grads = batch_norm_act_gradients(grad_out, x, statistics, ctx.setup,
                                             ctx.needs_input_grad[:3], ctx.param_dtypes)
        return *reject_double_backward(x, grads), *([None] * 9)


def normalization(kernels: BnActKernels, x, weight, bias, running_mean, running_var,
                  use_batch_stats: bool, momentum: float, eps: float, process_group):
    """``(mean, invstd, scale, shift, count)`` per channel, from the batch or the running stats.

    Batch statistics update the running buffers (if given) like BatchNorm. ``count`` is the number
    of values per channel (over the process group), None with running statistics.
    """
    compute = compute_dtype(x.dtype)
    channels = x.shape[1]
    count = None
    if use_batch_stats:
        mean, var = kernels.stats(x)
        count = x.numel() // channels if channels else 0
        if process_group is not None:
            mean, var, count = sync_stats(mean, var, count, process_group)
        if count <= 1:
            raise ValueError(
                "mishkit.BatchNormAct2d: expected more than 1 value per channel when "
                f"training, got input size {list(x.shape)}"
                + (" (summed over the process group)" if process_group is not None else "")
            )
        if running_mean is not None:
            unbiased = var * (count / (count - 1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(compute, copy=True), running_var.to(compute)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(compute)
    shift = torch.zeros_like(mean) if bias is None else bias.to(compute, copy=True)
    return mean, invstd, scale, shift, count


def parameter_dtypes(weight, bias) -> tuple:
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def batch_norm_act_gradients(grad_out, x, statistics, setup, needs, param_dtypes):
    """``(grad_x, grad_weight, grad_bias)`` of ``act(batch_norm(x))`` from the saved state.

    ``statistics`` = (mean, invstd, scale, shift); ``setup`` = (use_batch_stats, count, name,
    params, backend, process_group); ``needs``: whether x / weight / bias need a gradient.
    """
    mean, invstd, scale, shift = statistics
    use_batch_stats, count, name, params, backend, group = setup
    need_x, need_weight, need_bias = needs
    kernels = backends.kernels(backend).bn_act
    grad_out = match_layout(grad_out, x)  # size-1 dims are layout-neutral: no copy for them
    grad_x = grad_weight = grad_bias = None
    sum_dz = sum_dz_xmu = None
    if need_weight or need_bias or (need_x and use_batch_stats):
        if need_x and stores_dz(kernels, x, name):
            sum_dz, sum_dz_xmu, grad_out = kernels.backward_reduce_dz(
                grad_out, x, mean, scale, shift, name, params)
            name, params = IDENTITY  # grad_out is dz now
        else:
            sum_dz, sum_dz_xmu = kernels.backward_reduce(grad_out, x, mean, scale, shift, name,
                                                         params)
    if need_x:
        if use_batch_stats:
            total_dz, total_dz_xmu = sum_dz, sum_dz_xmu
            if group is not None:
                total_dz, total_dz_xmu = all_reduce_sum([sum_dz, sum_dz_xmu], group)
            per_value = scale / -count
            coef_const = total_dz * per_value
            coef_xmu = total_dz_xmu * per_value * invstd.square()
        else:  # running statistics: BN is a fixed per-channel affine map
            coef_xmu = coef_const = torch.zeros_like(scale)
        grad_x = kernels.backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const,
                                        name, params)
    weight_dtype, bias_dtype = param_dtypes
    if need_weight:
        grad_weight = (sum_dz_xmu * invstd).to(weight_dtype)
    if need_bias:
        grad_bias = sum_dz.to(bias_dtype)
    return grad_x, grad_weight, grad_bias


def stores_dz(kernels: BnActKernels, x: torch.Tensor, name: str) -> bool:
    """Whether backward takes dz from the reduce pass instead of recomputing it (see above):
    CPU kernels, a smooth activation (the others' derivatives are piecewise constant or one exp
    on one side, cheaper than the extra write), float32/float64 (a half dz would be rounded once
    more than the recomputed one)."""
    return (kernels.backward_reduce_dz is not None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and get_spec(name).smooth)


def reject_double_backward(anchor: torch.Tensor, grads: tuple) -> tuple:
    """``grads``, made an error to differentiate when backward runs with create_graph=True."""
    if torch.is_grad_enabled():
        return _RaiseOnDoubleBackward.apply(anchor, *grads)
    return grads


class _RaiseOnDoubleBackward(torch.autograd.Function):
    """Identity on the gradients whose own backward raises: BN+act is not twice differentiable."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            "mishkit BatchNormAct2d does not support double backward (gradients of its gradients); "
            "use nn.BatchNorm2d followed by the activation where second derivatives are needed"
        )
