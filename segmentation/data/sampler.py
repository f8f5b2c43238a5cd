"""Aspect-ratio grouped batch sampler carrying the per-batch random choices.

All randomness of the training pipeline is drawn here, in the main process, from a generator
seeded with ``(seed, epoch)``; each batch is a list of :class:`SampleSpec` that the dataset
executes. Results therefore do not depend on the number of DataLoader workers, and every
distributed rank draws the same permutation and keeps its own disjoint share of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


class SampleSpec(NamedTuple):
    """What the training dataset should produce: sample ``index`` at ``short_side``, flipped?"""

    index: int
    short_side: int
    flip: bool


def aspect_group(height: int, width: int) -> int:
    """0 for landscape or square images, 1 for portrait (the CSAIL grouping)."""
    return 0 if width >= height else 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class AspectRatioBatchSampler(Sampler[list[SampleSpec]]):
    """Yields batches of images of one aspect group, all scaled to one random short side.

    Args:
        sizes: ``(height, width)`` per dataset index (e.g. ``TrainDataset.sizes``).
        batch_size: images per batch *per rank*.
        img_sizes: candidate short sides; one is drawn per batch.
        flip: draw a random horizontal flip per image (probability 1/2).
        shuffle: shuffle images and batch order each epoch; otherwise batches follow dataset
            order (short sides and flips are still drawn from the seeded generator).
        drop_last: drop incomplete group batches and the batches that do not divide evenly over
            the ranks; otherwise keep them and pad the last rank round with repeated batches.
        seed: base seed; the generator of an epoch is seeded with ``(seed, epoch)``.
        num_replicas, rank: distributed sharding; default from ``torch.distributed`` if
            initialized, else a single replica.

    Every rank yields exactly ``len(self)`` batches. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        img_sizes: Sequence[int],
        *,
        flip: bool = True,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not img_sizes or any(int(s) < 1 for s in img_sizes):
            raise ValueError(f"img_sizes must be a non-empty list of positive ints: {img_sizes}")
        world, own_rank = _world()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = own_rank if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        self.groups = np.array([aspect_group(h, w) for h, w in sizes], dtype=np.int64)
        self.batch_size = int(batch_size)
        self.img_sizes = tuple(int(s) for s in img_sizes)
        self.flip, self.shuffle, self.drop_last = flip, shuffle, drop_last
        self.seed, self.epoch = int(seed), 0
        if len(self) == 0:
            raise ValueError(
                f"{len(sizes)} images give no full batch of {batch_size} per rank on "
                f"{self.num_replicas} rank(s); lower batch_size or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation, scales and flips are drawn next."""
        self.epoch = int(epoch)

    def _total_batches(self) -> int:
        counts = np.bincount(self.groups, minlength=2)
        per_group = [
            c // self.batch_size if self.drop_last else math.ceil(c / self.batch_size)
            for c in counts
        ]
        return int(sum(per_group))

    def __len__(self) -> int:
        total = self._total_batches()
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(len(self.groups)) if self.shuffle else np.arange(len(self.groups))
        batches: list[list[int]] = []
        for group in (0, 1):
            members = order[self.groups[order] == group].tolist()
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[SampleSpec]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        specs = []
        for batch in self._epoch_batches(rng):
            short = self.img_sizes[int(rng.integers(len(self.img_sizes)))]
            flips = rng.random(len(batch)) < 0.5 if self.flip else np.zeros(len(batch), bool)
            specs.append([SampleSpec(i, short, bool(f)) for i, f in zip(batch, flips)])
        per_rank = len(self)
        needed = per_rank * self.num_replicas
        while len(specs) < needed:  # drop_last=False: repeat from the start so ranks stay equal
            specs.extend(specs[: needed - len(specs)])
        yield from specs[self.rank : needed : self.num_replicas]
