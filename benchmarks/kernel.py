"""The activation kernel grid: activation × dtype × size × mode × contender, one JSON row each.

A device-to-device copy of the same bytes is timed in the same run (on CPU with each case, in its
rounds; on GPU once per dtype and size); every row reports its bandwidth against it. The
contenders of a case are timed side by side (on CPU in many short alternating rounds,
``timing.measure_side_by_side``, their speed-ups and copy ratios taken round by round), so their
ratios share the machine's state.
Forward moves 2N elements, backward 3N (x and grad_out in, grad_in out), forward+backward 5N.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mishkit.registry import get_spec

from . import contenders as contenders_mod
from .probes import peak_memory_bytes, saved_bytes
from .timing import (
    Timing,
    TimingConfig,
    cycling,
    measure,
    measure_side_by_side,
    paired_ratio,
    rotation_count,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ELEMENTS_MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}
MODES = tuple(ELEMENTS_MOVED)


@dataclass(frozen=True)
class KernelGrid:
    activations: list[str]
    dtypes: list[str]
    log2_sizes: list[int]
    modes: list[str]
    contenders: list[str] | None = None  # None: all
    compile_activations: tuple[str, ...] = ("mish",)
    # (activation or "*", log2 size) patterns: matching cases run first, in pattern order
    first: tuple[tuple[str, int], ...] = ()
    time_budget_s: float | None = None  # cases left when it runs out are recorded as skipped

    def validate(self) -> None:
        for name in self.activations:
            get_spec(name)  # raises with the valid names
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
        bad = [m for m in self.modes if m not in ELEMENTS_MOVED]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
        bad = [s for s in self.log2_sizes if not 0 <= s <= 34]
        if bad:
            raise ValueError(f"log2 sizes must lie in 0..34, got {bad}")
        contenders_mod.resolve(self.contenders)

    def cases(self) -> list[tuple[str, str, int]]:
        """(activation, dtype, log2 size) in run order: the ``first`` patterns lead."""
        cases = [(a, d, s) for a in self.activations for d in self.dtypes for s in self.log2_sizes]

        def rank(case):
            return next((i for i, (activation, log2) in enumerate(self.first)
                         if activation in ("*", case[0]) and log2 == case[2]), len(self.first))

        return sorted(cases, key=rank)  # stable: the rest keep grid order


def run_kernel_grid(grid: KernelGrid, device: torch.device, timing: TimingConfig,
                    log: Callable[[str], None] = print) -> Iterator[dict]:
    """Yield one record per measured row (kernel rows, copy rows, and a skipped-cases note)."""
    grid.validate()
    chosen = contenders_mod.resolve(grid.contenders)
    ctx = contenders_mod.BuildContext(device, frozenset(grid.compile_activations))
    copy_cache: dict[tuple[str, int], Timing] = {}
    started = time.perf_counter()
    cases = grid.cases()
    for index, (activation, dtype_name, log2) in enumerate(cases):
        if grid.time_budget_s is not None and time.perf_counter() - started > grid.time_budget_s:
            yield {"record": "skipped", "reason": f"time budget of {grid.time_budget_s:g} s spent",
                   "cases": [list(c) for c in cases[index:]]}
            log(f"kernel grid: time budget spent, {len(cases) - index} case(s) skipped")
            return
        numel, dtype = 2**log2, DTYPES[dtype_name]
        spec = get_spec(activation)
        rows, pending = [], []
        copy_record = None
        if device.type == "cpu":
            # the copy is timed with the case's contenders, in the same alternating rounds
            copy_record = {"record": "copy", "activation": activation}
            pending.append((copy_record, _copy_step(numel, dtype, device, timing)))
        elif (dtype_name, log2) not in copy_cache:
            copy_cache[dtype_name, log2] = _time_copy(numel, dtype, device, timing)
            yield _copy_record(dtype_name, log2, numel, dtype, copy_cache[dtype_name, log2])
        # one input pool per mode, shared by the contenders: each reads the same data from the
        # same memory (where a buffer lands relative to another moves a copy-speed loop by ~10%)
        pools = {mode: _mode_inputs(mode, numel, dtype, device, timing) for mode in grid.modes}
        for contender in chosen:
            rows += _contender_rows(spec, contender, ctx, pools, numel, dtype, device, pending)
            if device.type == "cuda":  # one contender's steps (retained graphs) alive at a time
                _measure_pending(pending, device, timing)
        _measure_pending(pending, device, timing)
        if copy_record is not None:
            copy = _timing_of_row(copy_record)
            copy_record.update(_copy_record(dtype_name, log2, numel, dtype, copy))
            yield copy_record
        else:
            copy = copy_cache[dtype_name, log2]
        _add_ratios(rows, dtype, numel, copy)
        for row in rows:
            row.update(activation=activation, dtype=dtype_name, numel=numel, log2_numel=log2)
        log(f"[{index + 1}/{len(cases)}] {activation} {dtype_name} 2^{log2}: "
            + _one_line(rows) + f"  ({time.perf_counter() - started:.0f} s)")
        yield from rows


def _copy_step(numel: int, dtype: torch.dtype, device: torch.device, timing: TimingConfig):
    count = rotation_count(2 * numel * _itemsize(dtype), device, timing)
    pairs = [(torch.randn(numel, device=device).to(dtype), torch.empty(numel, dtype=dtype,
              device=device)) for _ in range(count)]
    next_pair = cycling(pairs)

    def copy():
        src, dst = next_pair()
        dst.copy_(src)

    return copy


def _time_copy(numel: int, dtype: torch.dtype, device: torch.device, timing: TimingConfig):
    return measure(_copy_step(numel, dtype, device, timing), device, timing)


def _copy_record(dtype_name, log2, numel, dtype, t: Timing) -> dict:
    bytes_moved = 2 * numel * _itemsize(dtype)
    return {"record": "copy", "dtype": dtype_name, "numel": numel, "log2_numel": log2,
            "bytes_moved": bytes_moved, "time_ms_median": t.median * 1e3,
            "time_ms_p20": t.p20 * 1e3, "time_ms_p80": t.p80 * 1e3,
            "time_ms_rounds": [r * 1e3 for r in t.rounds], "gbps": bytes_moved / t.median / 1e9}


def _timing_of_row(row: dict) -> Timing:
    return Timing(row["time_ms_median"] * 1e-3, row["time_ms_p20"] * 1e-3,
                  row["time_ms_p80"] * 1e-3, tuple(r * 1e-3 for r in row["time_ms_rounds"]))


def _contender_rows(spec, contender, ctx, pools: dict[str, list], numel, dtype, device,
                    pending: list) -> list[dict]:
    """The contender's rows; each timed one gets its step appended to ``pending`` for
    ``_measure_pending`` (all contenders of a case side by side)."""
    base = {"record": "kernel", "contender": contender.name, "role": contender.role}
    try:
        forward = contender.build(spec, ctx)
    except contenders_mod.Unavailable as exc:
        return [{**base, "mode": m, "status": "unavailable", "reason": str(exc)} for m in pools]
    rows = []
    try:
        saved = saved_bytes(forward, _inputs(numel, dtype, device, 1, grad=True)[0][0])
    except Exception as exc:  # recorded, not fatal: the timing rows still stand
        saved, saved_error = None, f"{type(exc).__name__}: {exc}"
    else:
        saved_error = None
    for mode, pool in pools.items():
        row = {**base, "mode": mode, "saved_bytes": saved}
        if saved_error:
            row["saved_bytes_error"] = saved_error
        try:
            step = _mode_step(mode, forward, pool)
            if contender.around is not None:
                step = contender.around(step)
            step()  # fails here, not inside the side-by-side timing
            peak = None
            if mode == "forward+backward" and device.type == "cuda":
                peak = peak_memory_bytes(_mode_step(mode, forward, pool[:1]), device)
        except Exception as exc:  # a contender that fails here must not end the whole run
            rows.append({**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({**row, "status": "ok", "peak_memory_bytes": peak})
        pending.append((rows[-1], step))
    return rows


def _measure_pending(pending: list, device, timing) -> None:
    """Time the pending steps side by side, fill in their rows' times, and empty the list."""
    timings = measure_side_by_side([step for _, step in pending], device, timing)
    for (row, _), t in zip(pending, timings):
        row.update(time_ms_median=t.median * 1e3, time_ms_p20=t.p20 * 1e3,
                   time_ms_p80=t.p80 * 1e3, time_ms_rounds=[r * 1e3 for r in t.rounds])
    pending.clear()


def _inputs(numel, dtype, device, count, grad):
    # N(0, 3^2): most mass in the curved region of every activation, some in both tails
    return [
        ((torch.randn(numel, device=device) * 3).to(dtype).requires_grad_(grad),
         torch.randn(numel, device=device).to(dtype))
        for _ in range(count)
    ]


def _mode_inputs(mode, numel, dtype, device, timing) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rotating pool of (x, grad_out) pairs for ``mode``."""
    count = rotation_count(ELEMENTS_MOVED[mode] * numel * _itemsize(dtype), device, timing)
    return _inputs(numel, dtype, device, count, grad=mode != "forward")


def _mode_step(mode, forward, pool) -> Callable[[], object]:
    """The zero-argument callable timed for ``mode``, cycling through ``pool``."""
    if mode == "forward":
        next_x = cycling([x for x, _ in pool])

        def step():
            with torch.no_grad():
                return forward(next_x())
    elif mode == "backward":
        graphs = [(x, forward(x), g) for x, g in pool]  # retained graphs: time backward only
        next_graph = cycling(graphs)

        def step():
            x, y, g = next_graph()
            return torch.autograd.grad(y, x, g, retain_graph=True)
    else:
        next_pair = cycling(pool)

        def step():
            x, g = next_pair()
            return torch.autograd.grad(forward(x), x, g)
    return step


def _add_ratios(rows: list[dict], dtype, numel, copy: Timing) -> None:
    """Bandwidth, ratio to the copy and speed-up against each baseline, per mode. Where the
    contenders were timed in rounds side by side, both ratios are taken round by round: the
    speed-up is the median of the per-round ratios (``speedup``) with their p20-p80
    (``speedup_spread``) and the 95% confidence interval of that median (``speedup_ci95``)."""
    copy_bytes = 2 * numel * _itemsize(dtype)
    copy_gbps = copy_bytes / copy.median / 1e9
    by_mode: dict[str, dict[str, Timing]] = {}
    for row in rows:
        if row["status"] == "ok":
            by_mode.setdefault(row["mode"], {})[row["contender"]] = _timing_of_row(row)
    for row in rows:
        if row["status"] != "ok":
            continue
        bytes_moved = ELEMENTS_MOVED[row["mode"]] * numel * _itemsize(dtype)
        gbps = bytes_moved / (row["time_ms_median"] * 1e-3) / 1e9
        times = by_mode[row["mode"]]
        own = times[row["contender"]]
        ratios = {b: paired_ratio(times[b], own)
                  for b in contenders_mod.BASELINES + contenders_mod.CPU_BUILDS if b in times}
        row.update(bytes_moved=bytes_moved, gbps=gbps, copy_gbps=copy_gbps,
                   copy_ratio=bytes_moved / copy_bytes * paired_ratio(copy, own).median,
                   speedup={b: r.median for b, r in ratios.items()},
                   speedup_spread={b: [r.p20, r.p80] for b, r in ratios.items()},
                   speedup_ci95={b: [r.ci_low, r.ci_high] for b, r in ratios.items()})


def _one_line(rows: list[dict]) -> str:
    best = {}
    for row in rows:
        if row["status"] == "ok" and row["mode"] == "forward":
            best[row["contender"]] = f"{row['gbps']:.1f}"
    return "forward GB/s " + " ".join(f"{k}={v}" for k, v in best.items())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
