"""``act(batch_norm(x) [+ residual])`` as plain torch ops: what ``backend="auto"`` runs under
``torch.compile``.

The eager path composes four opaque kernels inside an ``autograd.Function`` that saves ``x`` and
recomputes ``z`` in backward: the right trade in eager, but Inductor can neither fuse opaque ops
with the convolution before them nor choose what to save. Here the statistics, the normalization,
the residual add and the activation (:mod:`mishkit.backends.lowering`) are ordinary differentiable
ops, so BatchNorm's backward comes from autograd and Inductor fuses and rematerialises the whole
block like its own ``BatchNorm2d`` + activation, while the numerics stay mishkit's: statistics and
activation in the compute dtype (float32 for half inputs, rounded once at the end), the biased
variance for normalizing and the unbiased one for the running average, the kernels' activation
formulas. The cross-process statistics of SyncBatchNormAct2d use differentiable functional
collectives (:func:`.distributed.sync_moments`), whose backward sums the gradients over the group.
"""

from __future__ import annotations

import torch

from .._checks import compute_dtype
from ..backends import lowering
from .distributed import sync_moments


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def batch_norm_act(x, running_mean, running_var, weight, bias, use_batch_stats: bool,
                   momentum: float, eps: float, name: str, params: tuple, process_group=None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The lowered ``act(batch_norm(x) [+ residual])``; arguments validated by the caller."""
    compute = compute_dtype(x.dtype)
    xc = x.to(compute)
    channels = x.shape[1]
    if use_batch_stats:
        dims = [0, *range(2, x.dim())]
        count = x.numel() // channels if channels else 0
        if process_group is None:
            check_count(count, x)
            var, mean = torch.var_mean(xc, dim=dims, correction=0)
            bessel = count / (count - 1)
        else:
            mean, var, total = sync_moments(xc, dims, count, process_group)
            torch._assert_async(total > 1, "mishkit.BatchNormAct2d: expected more than 1 value "
                                "per channel when training (summed over the process group)")
            bessel = total / (total - 1)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_var.lerp_((var.detach() * bessel).to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(compute), running_var.to(compute)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    z = (xc - _channel_view(mean, x)) * _channel_view(scale, x)
    if bias is not None:
        z = z + _channel_view(bias.to(compute), x)
    if residual is not None:
        z = z + residual.to(compute)
    return lowering.activation(z, name, params).to(x.dtype)


def check_count(count: int, x: torch.Tensor) -> None:
    """BatchNorm's error for a training batch with a single value per channel."""
    if count <= 1:
        raise ValueError(
            "mishkit.BatchNormAct2d: expected more than 1 value per channel when training, got "
            f"input size {list(x.shape)}"
        )
