"""Cross-process reductions of :class:`~mishkit.batchnorm.SyncBatchNormAct2d`, between kernel calls.

Statistics travel as (count, mean, biased variance) per rank, so ranks may hold different batch
sizes (and an empty rank contributes nothing); backward sums are all-reduced in one message.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sync_stats(mean, var, count: int, group):
    """Combine per-rank (count, mean, biased var) over ``group``; counts may differ per rank."""
    if count == 0:  # an empty rank contributes nothing (its local stats are nan)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 2C + 1)
    channels = mean.numel()
    counts = table[:, -1:]
    total = counts.sum()
    means, variances = table[:, :channels], table[:, channels : 2 * channels]
    global_mean = (counts * means).sum(0) / total
    # parallel variance (Chan et al.): within-rank spread + spread of the rank means
    global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
    return global_mean, global_var, int(total.item())


def all_reduce_sum(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Sum each tensor over ``group`` with a single all_reduce of their concatenation."""
    flat = torch.cat(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return list(flat.split([t.numel() for t in tensors]))
