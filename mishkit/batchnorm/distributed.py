"""Cross-process reductions of :class:`~mishkit.batchnorm.SyncBatchNormAct2d`, between kernel calls.

Statistics travel as (count, mean, biased variance) per rank, so ranks may hold different batch
sizes (and an empty rank contributes nothing); backward sums are all-reduced in one message.
Under torch.compile, :func:`sync_moments` computes them with differentiable functional
collectives instead, so autograd all-reduces the gradients (see :mod:`.lowering`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

if dist.is_available():  # builds without distributed support have no process groups to sync
    from torch.distributed import _functional_collectives as funcol


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


def sync_moments(x: torch.Tensor, dims: list[int], count, group):
    """``(mean, biased var, total count)`` per channel of ``x`` over ``group``, differentiable.

    Two passes, as a single-process variance: the global mean first, then the global sum of
    squared deviations from it (no E[x^2] - E[x]^2 cancellation). The functional all_reduce's
    backward all-reduces the gradient, which is exactly SyncBatchNorm's cross-rank gradient term.
    """
    local = torch.cat([x.sum(dims), torch.full((1,), count, dtype=x.dtype, device=x.device)])
    sums = funcol.all_reduce(local, "sum", group)
    total = sums[-1]
    mean = sums[:-1] / total
    deviation = x - mean.view(1, -1, *([1] * (x.dim() - 2)))
    var = funcol.all_reduce(deviation.square().sum(dims), "sum", group) / total
    return mean, var, total
