"""Timing one zero-argument callable: median and p20/p80 in seconds, warmed up first.

GPU: ``triton.testing.do_bench`` (CUDA events; it flushes L2 before every repetition, so inputs
are never cache-hot) with CUDA events as the fallback. CPU: ``torch.utils.benchmark``, whose
blocked measurements give the spread; CPU inputs are rotated by the caller (``rotation_count``),
and contenders compared with each other are timed in many short alternating rounds
(``measure_side_by_side``), their ratios taken round by round (``paired_ratio``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import random
import time
import timeit
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
    # seconds per call in each alternating round (measure_side_by_side on CPU), for paired_ratio
    rounds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Ratio:
    """A ratio of two timings: the median, p20 and p80 of its per-round values, and the
    distribution-free 95% confidence interval of that median (``ci_low``..``ci_high``)."""

    median: float
    p20: float
    p80: float
    ci_low: float
    ci_high: float
    rounds: int  # 0: timed apart, the ratio of the medians


def paired_ratio(numerator: Timing, denominator: Timing) -> Ratio:
    """numerator / denominator over the rounds both were timed in side by side (a drift of the
    machine moves both sides of a round alike); the ratio of the medians, with no spread, for
    timings without rounds."""
    if not numerator.rounds or len(numerator.rounds) != len(denominator.rounds):
        ratio = numerator.median / denominator.median
        return Ratio(ratio, ratio, ratio, ratio, ratio, 0)
    ratios = sorted(a / b for a, b in zip(numerator.rounds, denominator.rounds))
    low, high = median_interval_ranks(len(ratios))
    return Ratio(_quantile(ratios, 0.5), _quantile(ratios, 0.2), _quantile(ratios, 0.8),
                 ratios[low], ratios[high], len(ratios))


def median_interval_ranks(n: int, z: float = 1.96) -> tuple[int, int]:
    """0-based ranks of the sorted samples bounding a ~95% confidence interval of the median of
    ``n`` independent samples: the order statistics j and n + 1 - j (1-based) of the
    binomial(n, 1/2) normal approximation; wider than 95% below about 20 samples, the whole
    range below 6."""
    j = math.floor(n / 2 - z * math.sqrt(n) / 2)
    return max(0, j - 1), min(n - 1, n - j)


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure. GPU values are do_bench's milliseconds, CPU ones seconds."""

    gpu_warmup_ms: float = 10.0
    gpu_rep_ms: float = 40.0
    cpu_min_run_time_s: float = 0.2  # per callable; side by side, their rounds share it
    warmup_calls: int = 3
    # Rotate CPU inputs across at least this many bytes: twice the 32 MiB L3 of the reference
    # machine, so a small input comes from memory, as inside a network, not from cache.
    cpu_rotation_bytes: int = 64 * 2**20
    # CPU contenders of one case are timed side by side in alternating rounds, each one block of
    # about cpu_block_s per round, at least cpu_rounds rounds: this shared machine's memory
    # bandwidth halves and recovers within a second, and blocks this short rarely straddle a
    # change, so the contenders of a round run under one condition.
    cpu_block_s: float = 0.002
    cpu_rounds: int = 5
    # untimed calls before each block: the first call after another contender pays for the
    # state that one left (cold TLB and caches), which is not this callable's own speed
    cpu_block_warmup_calls: int = 1


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
    """Time several callables against each other: on CPU in alternating rounds (each in a
    random order) of one block of calls per callable, as many rounds as
    ``cpu_min_run_time_s`` per callable allows (at least ``cpu_rounds``), each round's
    seconds per call kept for :func:`paired_ratio`; on GPU one after the other (do_bench's
    repetitions already interleave with L2 flushes, and fewer live inputs keep memory low)."""
    if device.type == "cuda" or config.cpu_rounds <= 1 or len(fns) == 1:
        return [measure(fn, device, config) for fn in fns]
    call_s = [_warm_call_seconds(fn, config.warmup_calls) for fn in fns]
    calls_per_block = [max(1, round(config.cpu_block_s / s)) for s in call_s]
    round_s = sum((n + config.cpu_block_warmup_calls) * s for n, s in zip(calls_per_block, call_s))
    rounds = max(config.cpu_rounds, math.ceil(len(fns) * config.cpu_min_run_time_s / round_s))
    # stdlib timeit, not torch.utils.benchmark's Timer.timeit: that one runs
    # max(number / 100, 2) warm-up calls before every measurement, tripling one-call blocks
    timers = [timeit.Timer(fn) for fn in fns]
    per_call: list[list[float]] = [[] for _ in fns]
    order = random.Random(0)  # seeded: a rerun times the same sequence
    for _ in range(rounds):
        # each round in a new random order: what ran just before a callable (the dirty cache
        # lines, the allocator state it left) moved a copy-speed loop by 5-20%, and a rotation
        # keeps each callable's predecessor, so that would have stayed a bias in its ratios
        for i in order.sample(range(len(fns)), len(fns)):
            for _ in range(config.cpu_block_warmup_calls):
                fns[i]()
            per_call[i].append(timers[i].timeit(calls_per_block[i]) / calls_per_block[i])
    return [dataclasses.replace(_timing_of(sorted(times)), rounds=tuple(times))
            for times in per_call]


def _warm_call_seconds(fn, warmup_calls: int) -> float:
    """Warm ``fn`` up (at least one call) and return its fastest call's seconds."""
    fastest = math.inf
    for _ in range(max(1, warmup_calls)):
        start = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - start)
    return max(fastest, 1e-9)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory_for_reuse() -> str:
    """Fix glibc malloc's thresholds for this process: blocks of up to 32 MiB come from the heap,
    and the heap is not trimmed, so freed memory stays mapped for the next allocations; returns
    what was done, for the run's metadata.

    glibc adapts its mmap threshold and trims the top of the heap when enough of it is free: what
    a contender allocated and freed before decided whether the next one's 16 MiB output came with
    fresh pages (4096 page faults, 3-5 ms on a 0.4 ms kernel). Fixed thresholds take that out of
    every contender alike, as a caching allocator (jemalloc, PyTorch's CUDA one) would."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt in this process)"
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(_M_TRIM_THRESHOLD, 1 << 30) != 1:
        return "default (mallopt refused)"
    return "glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB (mallopt)"


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
