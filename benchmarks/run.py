"""``python -m benchmarks``: kernel, fused BatchNorm+activation, network and compiled-network
benchmarks.

Presets pick the grid (``--smoke`` for CI, ``cpu`` and ``gpu`` for full runs); any option given
on the command line overrides the preset's value. Results land in ``--out`` (default
``benchmarks/results/<device>/``): ``results.jsonl`` (one record per line, the first being the
run's metadata), ``summary.md`` with the targets table, and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mishkit import backends
from mishkit.registry import ACTIVATIONS

from . import figures, report, summary
from .kernel import MODES, KernelGrid, run_kernel_grid
from .layers import CompileConfig, NetworkConfig, run_bn_act, run_compiled_networks, run_network
from .timing import TimingConfig, keep_freed_memory_for_reuse

ALL = tuple(ACTIVATIONS)
SEGMENTATION, STACK = "resnet50dilated+ppm_deepsup", "conv-bn-act stack"  # layers.NETWORKS keys


@dataclass(frozen=True)
class Preset:
    activations: tuple[str, ...]
    dtypes: tuple[str, ...]
    log2_sizes: tuple[int, ...]
    compile_activations: tuple[str, ...]
    bn_shape: tuple[int, int, int, int]
    network: tuple[str, int, int]  # model, batch, image size of the timed training step
    memory: tuple[str, int, int]  # model, batch, image size of the saved-bytes table
    # (model, batch, image size) per network of the torch.compile comparison
    compile_networks: tuple[tuple[str, int, int], ...] = ()
    compile_backend: str = "inductor"
    compile_min_run_s: float = 2.0  # per variant on CPU: a ResNet50 step takes about a second
    first: tuple[tuple[str, int], ...] = ()
    time_budget_s: float | None = None
    timing: dict = field(default_factory=dict)  # TimingConfig overrides
    bn_activations: tuple[str, ...] = ("mish",)


PRESETS: dict[str, Preset] = {
    # CI: the whole harness path (JSON lines, summary, PNGs) in well under a minute on 2 cores
    "smoke": Preset(("mish", "relu"), ("fp32", "bf16"), (12, 14), (), (2, 8, 8, 8),
                    (STACK, 2, 32), (STACK, 2, 32), compile_networks=((STACK, 2, 16),),
                    compile_backend="aot_eager", compile_min_run_s=0.0,
                    timing={"cpu_min_run_time_s": 0.01, "warmup_calls": 1, "cpu_rotation_bytes": 0,
                            "gpu_warmup_ms": 2, "gpu_rep_ms": 5}),
    "cpu": Preset(("mish", "silu", "gelu", "relu", "hardswish", "softplus", "tanhexp", "elu"),
                  ("fp32", "bf16"), tuple(range(12, 25, 2)), ("mish",), (8, 64, 64, 64),
                  (SEGMENTATION, 2, 96), (SEGMENTATION, 2, 512),
                  compile_networks=((STACK, 4, 64), (SEGMENTATION, 2, 96)),
                  first=(("mish", 22), ("*", 22)),
                  time_budget_s=600, timing={"cpu_min_run_time_s": 0.1}),
    # the GPU suite: every activation and dtype, 2^12..2^28 by powers of 4, target rows first;
    # torch.compile only for Mish (its target), as each compiled graph costs seconds of budget
    "gpu": Preset(ALL, ("fp32", "bf16", "fp16"), tuple(range(12, 29, 2)), ("mish",),
                  (8, 512, 64, 64), (SEGMENTATION, 2, 512), (SEGMENTATION, 2, 512),
                  compile_networks=((STACK, 16, 128), (SEGMENTATION, 2, 512)),
                  first=(("mish", 26), ("*", 26)),
                  timing={"gpu_warmup_ms": 5, "gpu_rep_ms": 20}, bn_activations=("mish", "silu")),
}
SUITES = ("kernel", "bn_act", "network", "memory", "compile")
TARGET_LOG2 = {"cuda": 26, "cpu": 22}


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_networks(text: str) -> list[tuple[str, int, int]]:
    """``resnet:2:512,stack:4:64``: (network, batch, image size) per compiled network."""
    short = {"resnet": SEGMENTATION, "stack": STACK}
    networks = []
    for item in _csv(text):
        name, _, rest = item.partition(":")
        try:
            batch, size = (int(v) for v in rest.split(":"))
        except ValueError:
            batch = size = None
        if name not in short or batch is None or batch < 1 or size < 1:
            raise argparse.ArgumentTypeError(
                f"--compile-networks expects NAME:BATCH:SIZE items with NAME in {sorted(short)}, "
                f"e.g. resnet:2:512, got {item!r}")
        networks.append((short[name], batch, size))
    return networks


def parse_sizes(text: str) -> list[int]:
    """``12:24:2`` (inclusive range of log2 sizes) or ``12,16,22``."""
    try:
        if ":" in text:
            start, stop, *step = (int(v) for v in text.split(":"))
            return list(range(start, stop + 1, step[0] if step else 1))
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes expects log2 sizes like 12:24:2 or 12,16,22, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny CI run (same as --preset smoke)")
    parser.add_argument("--preset", choices=PRESETS, help="grid preset (default: gpu on a CUDA "
                        "machine, else cpu)")
    parser.add_argument("--out", type=Path, help="output folder (default "
                        "benchmarks/results/<device>)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--suites", type=_csv, default=list(SUITES),
                        help=f"comma list of {', '.join(SUITES)} (default all)")
    parser.add_argument("--activations", type=_csv, help="comma list of activation names")
    parser.add_argument("--dtypes", type=_csv, help="comma list of fp32, bf16, fp16")
    parser.add_argument("--sizes", type=parse_sizes, help="log2 sizes: 12:24:2 or 12,16,22")
    parser.add_argument("--modes", type=_csv, help="forward, backward, forward+backward")
    parser.add_argument("--contenders", type=_csv, help="comma list (default all)")
    parser.add_argument("--compile-activations", type=_csv,
                        help="activations for which torch.compile is a contender")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for the kernel grid; cases left over are recorded skipped")
    parser.add_argument("--cpu-seconds", type=_positive_seconds,
                        help="seconds each CPU contender is timed per case, in alternating "
                        "rounds (default: the preset's)")
    parser.add_argument("--compile-backend",
                        help="torch.compile backend of the compile suite (default: the preset's, "
                        "inductor except in --smoke)")
    parser.add_argument("--compile-networks", type=parse_networks,
                        help="networks of the compile suite as NAME:BATCH:SIZE, NAME resnet or "
                        "stack (default: the preset's), e.g. resnet:2:512")


def main(argv: list[str] | None = None) -> int:
    description = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        raise SystemExit(f"bench: unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    preset = PRESETS["smoke" if args.smoke else args.preset or
                     ("gpu" if device.type == "cuda" else "cpu")]
    grid = KernelGrid(
        activations=args.activations or list(preset.activations),
        dtypes=args.dtypes or list(preset.dtypes),
        log2_sizes=args.sizes or list(preset.log2_sizes),
        modes=args.modes or list(MODES), contenders=args.contenders,
        compile_activations=tuple(args.compile_activations if args.compile_activations is not None
                                  else preset.compile_activations),
        first=preset.first,
        time_budget_s=args.time_budget if args.time_budget is not None else preset.time_budget_s)
    try:
        grid.validate()
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    timing = dataclasses.replace(TimingConfig(), **preset.timing)
    if args.cpu_seconds is not None:
        timing = dataclasses.replace(timing, cpu_min_run_time_s=args.cpu_seconds)
    out = args.out or Path("benchmarks/results") / report.device_slug(device)
    ours = "mishkit-" + backends.choose("auto", device, "mish")
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    writer = report.ResultsWriter(out)
    malloc = keep_freed_memory_for_reuse() if device.type == "cpu" else "default"
    writer.write([{**report.metadata(device, sys.argv), "cpu_malloc": malloc}])
    bn_dtypes = [d for d in grid.dtypes if d != "fp16" and (d == "fp32" or device.type == "cuda")]
    suites = {
        "kernel": lambda: run_kernel_grid(grid, device, timing, log),
        "bn_act": lambda: run_bn_act(list(preset.bn_activations), bn_dtypes, preset.bn_shape,
                                     device, timing, log),
        "network": lambda: run_network(NetworkConfig(*preset.network, time_it=True), device,
                                       timing, "network", log),
        "memory": lambda: run_network(NetworkConfig(*preset.memory, time_it=False), device,
                                      timing, "memory", log),
        "compile": lambda: run_compiled_networks(
            CompileConfig(tuple(args.compile_networks or preset.compile_networks),
                          args.compile_backend or preset.compile_backend,
                          preset.compile_min_run_s),
            device, timing, log),
    }
    try:
        for name in args.suites:
            try:
                writer.write(suites[name]())
            except Exception as exc:  # one broken suite must not lose the others' results
                reason = f"{type(exc).__name__}: {exc}"
                log(f"suite {name} stopped: {reason}")
                writer.write([{"record": "suite_error", "suite": name, "reason": reason}])
        writer.write([{"record": "end", "wall_s": time.perf_counter() - started,
                       "load_average_end": list(os.getloadavg())}])
        targets = report.evaluate_targets(writer.records, device.type, ours)
        writer.write({"record": "target", **t} for t in targets)
    finally:
        writer.close()
    records = writer.records
    text = summary.render(records, targets, ours, TARGET_LOG2[device.type])
    summary.write_summary(out, text)
    pngs = figures.write_figures(records, out, ours,
                                 summary.headline_log2(records, TARGET_LOG2[device.type]))
    print("\n".join(["", *summary.targets_table(targets), ""]))
    print(f"wrote {writer.path}, {out / 'summary.md'} and {len(pngs)} PNG(s) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0
