"""Timing one zero-argument callable: median and p20/p80 in seconds, warmed up first.

GPU: ``triton.testing.do_bench`` (CUDA events; it flushes L2 before every repetition, so inputs
are never cache-hot) with CUDA events as the fallback. CPU: ``torch.utils.benchmark``, whose
blocked measurements give the spread; CPU inputs are rotated by the caller (``rotation_count``),
and contenders compared with each other are timed in alternating rounds (``measure_side_by_side``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.utils.benchmark as torch_benchmark

MAX_ROTATION = 1024


@dataclass(frozen=True)
class Timing:
    median: float  # seconds
    p20: float
    p80: float
    # the median of each alternating round (measure_side_by_side on CPU), for paired ratios
    rounds: tuple[float, ...] = ()


def paired_ratio(numerator: Timing, denominator: Timing) -> tuple[float, float, float]:
    """numerator / denominator as (median, p20, p80) over the rounds both were timed in side by
    side (a drift of the machine moves both sides of a round alike); the ratio of the medians,
    three times, for timings without rounds."""
    if not numerator.rounds or len(numerator.rounds) != len(denominator.rounds):
        ratio = numerator.median / denominator.median
        return ratio, ratio, ratio
    ratios = sorted(a / b for a, b in zip(numerator.rounds, denominator.rounds))
    return _quantile(ratios, 0.5), _quantile(ratios, 0.2), _quantile(ratios, 0.8)


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure. GPU values are do_bench's milliseconds, CPU ones seconds."""

    gpu_warmup_ms: float = 10.0
    gpu_rep_ms: float = 40.0
    cpu_min_run_time_s: float = 0.2
    warmup_calls: int = 3
    # Rotate CPU inputs across at least this many bytes: twice the 32 MiB L3 of the reference
    # machine, so a small input comes from memory, as inside a network, not from cache.
    cpu_rotation_bytes: int = 64 * 2**20
    # CPU contenders of one case are timed in this many alternating rounds (cpu_min_run_time_s
    # split across them): on a shared machine memory bandwidth drifts by up to 2x within
    # seconds, and timing each contender in one stretch turned that drift into their ratios.
    cpu_rounds: int = 5


def rotation_count(bytes_per_input: int, device: torch.device, config: TimingConfig) -> int:
    """How many distinct input sets to cycle through so the working set exceeds the cache."""
    if device.type == "cuda" or bytes_per_input <= 0:
        return 1  # do_bench flushes L2 between repetitions
    return max(1, min(MAX_ROTATION, math.ceil(config.cpu_rotation_bytes / bytes_per_input)))


def cycling(items: Sequence):
    """A zero-argument callable returning the items in turn (cheap: one C-level next())."""
    return itertools.cycle(items).__next__


def measure(fn: Callable[[], object], device: torch.device, config: TimingConfig) -> Timing:
    """Warm ``fn`` up, then time it on ``device``; raises whatever ``fn`` raises."""
    for _ in range(config.warmup_calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return _measure_cuda(fn, config)
    return _measure_cpu(fn, config)


def measure_side_by_side(fns: Sequence[Callable[[], object]], device: torch.device,
                         config: TimingConfig) -> list[Timing]:
    """Time several callables against each other: on CPU in ``cpu_rounds`` alternating rounds
    (each in a rotated order), each callable's blocks pooled over the rounds and each round's
    median kept, for :func:`paired_ratio`; on GPU one after the other (do_bench's repetitions
    already interleave with L2 flushes, and fewer live inputs keep memory low)."""
    if device.type == "cuda" or config.cpu_rounds <= 1 or len(fns) == 1:
        return [measure(fn, device, config) for fn in fns]
    for fn in fns:
        for _ in range(config.warmup_calls):
            fn()
    per_round = config.cpu_min_run_time_s / config.cpu_rounds
    blocks: list[list[float]] = [[] for _ in fns]
    round_medians: list[list[float]] = [[] for _ in fns]
    for round_index in range(config.cpu_rounds):
        # each round starts one callable later: what ran just before a callable (the cache and
        # the allocator's state it left) changes from round to round instead of biasing it
        for i in _rotated(range(len(fns)), round_index):
            this_round = sorted(_cpu_blocks(fns[i], per_round))
            round_medians[i].append(_quantile(this_round, 0.5))
            blocks[i] += this_round
    return [dataclasses.replace(_timing_of(sorted(times)), rounds=tuple(medians))
            for times, medians in zip(blocks, round_medians)]


def _rotated(items: Sequence, shift: int) -> list:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def _cpu_blocks(fn, min_run_time: float) -> list[float]:
    """Seconds per call, one value per block of ``torch.utils.benchmark``'s blocked_autorange."""
    # Timer runs its statement with num_threads threads (default 1, whatever torch has set):
    # time with the process's thread count, which the records report as torch_threads
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                  num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def _timing_of(sorted_times: Sequence[float]) -> Timing:
    return Timing(_quantile(sorted_times, 0.5), _quantile(sorted_times, 0.2),
                  _quantile(sorted_times, 0.8))


def _measure_cpu(fn, config: TimingConfig) -> Timing:
    return _timing_of(sorted(_cpu_blocks(fn, config.cpu_min_run_time_s)))


def _measure_cuda(fn, config: TimingConfig) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _measure_cuda_events(fn, config)
    median, p20, p80 = do_bench(
        fn, warmup=config.gpu_warmup_ms, rep=config.gpu_rep_ms, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(median * 1e-3, p20 * 1e-3, p80 * 1e-3)


def _measure_cuda_events(fn, config: TimingConfig) -> Timing:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    repetitions = max(5, int(config.gpu_rep_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(repetitions):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty sequence."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
