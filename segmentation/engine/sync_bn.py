"""Synchronized BatchNorm for CPU process groups (gloo).

``torch.nn.SyncBatchNorm`` runs on GPUs only (its statistics kernels have no CPU version, and
DDP rejects it in a CPU module). :class:`GlooSyncBatchNorm` computes the same batch statistics
with autograd-aware all-reduces, so ``torchrun`` on CPU trains exactly like one process on the
global batch. It keeps BatchNorm2d's state-dict keys; checkpoints move freely between the two.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

# The suggested replacement (torch.distributed._functional_collectives) is a private API.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
    category=FutureWarning)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of every rank's batch (any backend, CPU included)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._group_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in >= float32
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        # Two passes (mean, then centred squares) keep the variance accurate; the all-reduces
        # carry gradients, so backward matches BatchNorm over the concatenated batch.
        stats = dist_fn.all_reduce(torch.cat([xf.sum(dims), count]), group=group)
        total = stats[-1]
        mean = stats[:-1] / total
        centred = xf - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims), group=group) / total
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.detach())
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, total) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * total / (total - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _replacement(bn: nn.SyncBatchNorm) -> GlooSyncBatchNorm:
    new = GlooSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                            bn.track_running_stats, bn.process_group, device="meta")
    # Share the very Parameter/buffer objects: optimizers and hooks keep working.
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(new, name, buf)
    new.train(bn.training)
    return new


def convert_to_gloo_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``module`` by :class:`GlooSyncBatchNorm`."""
    if isinstance(module, nn.SyncBatchNorm):
        return _replacement(module)
    for name, child in list(module.named_children()):
        setattr(module, name, convert_to_gloo_sync_bn(child))
    return module


def count_native_sync_bn(module: nn.Module) -> int:
    return sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules())


def use_sync_bn(setting: str, world_size: int) -> bool:
    """``TRAIN.sync_bn``: ``auto`` syncs when there is more than one process."""
    return {"auto": world_size > 1, "true": True, "false": False}[setting]
