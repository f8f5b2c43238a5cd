"""Run metadata, JSON-lines output, the targets table and the markdown summary."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mishkit import __version__, backends, info

from .contenders import CPU_BUILD_PREFIX, CPU_BUILDS

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.md"


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's "model name", "cpu family" and "model" from /proc/cpuinfo."""
    fields = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return fields
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model") and key not in fields:
            fields[key] = value.strip()
    return fields


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its family and model numbers and core count:
    virtual machines report one model name ("AMD EPYC") for CPUs generations apart (family 25 is
    Zen 3 with AVX2, family 26 Zen 5 with AVX-512), and the numbers tell them apart."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields = _cpuinfo_fields()
    model = fields.get("model name") or platform.processor() or platform.machine()
    numbers = ""
    if "cpu family" in fields and "model" in fields:
        numbers = f"family {fields['cpu family']}, model {fields['model']}, "
    return f"{model} ({numbers}{os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """Directory name under benchmarks/results/, e.g. nvidia-h100-80gb-hbm3,
    cpu-amd-epyc-family25-model1-2c."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        fields = _cpuinfo_fields()
        name = "cpu-" + (fields.get("model name") or platform.processor() or platform.machine())
        if "cpu family" in fields and "model" in fields:
            name += f"-family{fields['cpu family']}-model{fields['model']}"
        name += f"-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def metadata(device: torch.device, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "record": "meta", "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "mishkit": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()), "backends": backends.backend_status(),
        "argv": argv, **cpu_build(),
    }


def cpu_build() -> dict:
    """Which instruction-set build the CPU kernels run, and why (``mishkit info``'s words)."""
    ext = info.collect()["extension"]
    return {"cpu_capability": ext["cpu_capability"],
            "cpu_capability_reason": ext["cpu_capability_reason"]}


class ResultsWriter:
    """Appends records to ``results.jsonl`` as they arrive, so a killed run keeps its rows."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / RESULTS_FILE
        self.records: list[dict] = []
        self._file = self.path.open("w")

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            self.records.append(record)
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_results(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from None
    return records


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    record: str  # "kernel", "bn_act" or "compile_network"
    where: dict  # fields the row must match
    metric: str  # field, or "speedup.<baseline>"
    op: str  # ">=" or "<="
    threshold: float


def _kernel_targets(log2: int, dtypes: tuple[str, ...]) -> list[Target]:
    targets = []
    for d in dtypes:
        at = {"activation": "mish", "dtype": d, "log2_numel": log2}
        targets += [
            Target(f"Mish forward {d} ≥ 90% of copy bandwidth", "kernel",
                   {**at, "mode": "forward"}, "copy_ratio", ">=", 0.90),
            Target(f"Mish backward {d} ≥ 85% of copy bandwidth", "kernel",
                   {**at, "mode": "backward"}, "copy_ratio", ">=", 0.85),
            Target(f"Mish fwd+bwd {d} ≥ 3× naive composite", "kernel",
                   {**at, "mode": "forward+backward"}, "speedup.naive", ">=", 3.0),
            Target(f"Mish fwd+bwd {d} no slower than native F.mish", "kernel",
                   {**at, "mode": "forward+backward"}, "speedup.native", ">=", 1.0),
            Target(f"Mish fwd+bwd {d} no slower than torch.compile", "kernel",
                   {**at, "mode": "forward+backward"}, "speedup.compile", ">=", 1.0),
        ]
    return targets


def _compile_targets() -> list[Target]:
    """Per network of the compile suite: compiled mishkit vs compiled native, eager fused BN."""
    targets = []
    for network in ("conv-bn-act stack", "resnet50dilated+ppm_deepsup"):  # layers.NETWORKS keys
        at = {"network": network}
        for variant in ("compile mishkit", "compile mishkit fuse_bn"):
            where = {**at, "variant": variant}
            targets += [
                Target(f"{network}: {variant} saved bytes ≤ compile native", "compile_network",
                       where, "saved_ratio_vs_compile_native", "<=", 1.0),
                Target(f"{network}: {variant} fwd+bwd time ≤ 1.0× compile native",
                       "compile_network", where, "time_ratio_vs_compile_native", "<=", 1.0),
            ]
        where = {**at, "variant": "eager mishkit fuse_bn"}
        targets += [
            Target(f"{network}: eager mishkit fuse_bn time ≤ eager mishkit", "compile_network",
                   where, "time_ratio_vs_eager_mishkit", "<=", 1.0),
            Target(f"{network}: eager mishkit fuse_bn time ≤ 1.2× compile native",
                   "compile_network", where, "time_ratio_vs_compile_native", "<=", 1.2),
        ]
        where = {**at, "variant": "eager mishkit fuse_bn output"}
        targets += [
            Target(f"{network}: eager fuse_bn='output' saved bytes ≤ compile native",
                   "compile_network", where, "saved_ratio_vs_compile_native", "<=", 1.0),
            Target(f"{network}: eager fuse_bn='output' fwd+bwd time ≤ 1.15× fuse_bn=True",
                   "compile_network", where, "time_ratio_vs_eager_fuse_bn", "<=", 1.15),
        ]
    return targets


GPU_TARGETS = [
    *_kernel_targets(26, ("fp32", "bf16")),
    Target("fused BN+Mish fwd+bwd ≥ 1.3× BN + F.mish", "bn_act",
           {"activation": "mish", "dtype": "fp32", "variant": "BatchNormAct2d"},
           "speedup_vs_bn_native", ">=", 1.3),
    Target("fused BN+Mish saved bytes ≤ 2/3 of BN + F.mish", "bn_act",
           {"activation": "mish", "dtype": "fp32", "variant": "BatchNormAct2d"},
           "saved_ratio_vs_bn_native", "<=", 2 / 3),
    *_compile_targets(),
]
CPU_TARGETS = [
    Target("CPU Mish forward fp32 2^22 no slower than native", "kernel",
           {"activation": "mish", "dtype": "fp32", "log2_numel": 22, "mode": "forward"},
           "speedup.native", ">=", 1.0),
    Target("CPU Mish fwd+bwd fp32 2^22 no slower than native", "kernel",
           {"activation": "mish", "dtype": "fp32", "log2_numel": 22, "mode": "forward+backward"},
           "speedup.native", ">=", 1.0),
    *(Target(f"CPU {name} forward fp32 2^22 ≥ 60% of copy bandwidth", "kernel",
             {"activation": name, "dtype": "fp32", "log2_numel": 22, "mode": "forward"},
             "copy_ratio", ">=", 0.60) for name in ("mish", "silu")),
    *_compile_targets(),
]


def _cpu_activation_targets(records: list[dict], ours: str) -> list[Target]:
    """Per activation measured at 2^22: forward ≥ 30% of copy (fp32), and forward and
    forward+backward no slower than torch's native op where one exists (each dtype measured)."""
    rows = [r for r in records if r.get("record") == "kernel" and r.get("log2_numel") == 22
            and r.get("contender") == ours]
    names = list(dict.fromkeys(r["activation"] for r in rows))
    natives = {(r["activation"], r["dtype"]) for r in records if r.get("record") == "kernel"
               and r.get("contender") == "native" and r.get("status") == "ok"}
    targets = []
    for name in names:
        at = {"activation": name, "log2_numel": 22}
        targets.append(Target(f"CPU {name} forward fp32 2^22 ≥ 30% of copy bandwidth", "kernel",
                              {**at, "dtype": "fp32", "mode": "forward"}, "copy_ratio", ">=",
                              0.30))
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["activation"] == name):
            if (name, dtype) not in natives:
                continue
            for mode, label in (("forward", "forward"), ("forward+backward", "fwd+bwd")):
                targets.append(Target(f"CPU {name} {label} {dtype} 2^22 no slower than native",
                                      "kernel", {**at, "dtype": dtype, "mode": mode},
                                      "speedup.native", ">=", 1.0))
    fixed = {c.label.lower() for c in CPU_TARGETS}
    return [t for t in targets if t.label.lower() not in fixed]


def _cpu_build_targets(records: list[dict], ours: str) -> list[Target]:
    """Where ISA builds were timed beside ``ours`` at 2^22: ours (the build the run's metadata
    names) no slower than each other build that ran. The build ours runs, timed again under its
    own name, is the run's null comparison, not a target."""
    meta = next((r for r in records if r.get("record") == "meta"), {})
    active = meta.get("cpu_capability")
    builds = list(dict.fromkeys(
        r["contender"] for r in records if r.get("record") == "kernel" and r.get("status") == "ok"
        and r.get("contender") in CPU_BUILDS and r["contender"] != CPU_BUILD_PREFIX + str(active)))
    if active is None or not builds:
        return []
    targets = []
    for r in records:
        if not (r.get("record") == "kernel" and r.get("contender") == ours
                and r.get("log2_numel") == 22 and r.get("status") == "ok"):
            continue
        label = "fwd+bwd" if r["mode"] == "forward+backward" else r["mode"]
        for build in builds:
            targets.append(Target(
                f"CPU {active} build {r['activation']} {label} {r['dtype']} 2^22 no slower than "
                f"the {build.removeprefix(CPU_BUILD_PREFIX)} build", "kernel",
                {"activation": r["activation"], "dtype": r["dtype"], "log2_numel": 22,
                 "mode": r["mode"]}, f"speedup.{build}", ">=", 1.0))
    return targets


def evaluate_targets(records: list[dict], device_type: str, ours: str) -> list[dict]:
    """Each target with its measured value and met / not met / not measured (with why)."""
    rows = []
    targets = (GPU_TARGETS if device_type == "cuda"
               else CPU_TARGETS + _cpu_activation_targets(records, ours)
               + _cpu_build_targets(records, ours))
    for target in targets:
        where = dict(target.where)
        if target.record == "kernel":
            where["contender"] = ours
        match = [r for r in records if r.get("record") == target.record
                 and all(r.get(k) == v for k, v in where.items())]
        value = _metric(match[0], target.metric) if match else None
        if value is None:
            why = match[0].get("reason", "baseline missing") if match else "row not in this run"
            rows.append({"target": target.label, "value": None, "threshold": target.threshold,
                         "status": f"not measured ({why})"})
            continue
        met = value >= target.threshold if target.op == ">=" else value <= target.threshold
        rows.append({"target": target.label, "value": value, "threshold": target.threshold,
                     "status": "met" if met else _unmet_status(match[0], target)})
    return rows


def _unmet_status(row: dict, target: Target) -> str:
    """"not met", or, for a speed-up whose median's 95% confidence interval reaches the
    threshold, "within noise" with that interval: this run cannot tell it from the threshold."""
    if not target.metric.startswith("speedup.") or target.op != ">=":
        return "not met"
    interval = row.get("speedup_ci95", {}).get(target.metric.split(".", 1)[1])
    if interval is None or interval[1] < target.threshold:
        return "not met"
    return f"within noise (95% CI of the median {interval[0]:.2f}–{interval[1]:.2f})"


def _metric(row: dict, metric: str) -> float | None:
    if row.get("status") != "ok":
        return None
    if metric.startswith("speedup."):
        return row.get("speedup", {}).get(metric.split(".", 1)[1])
    return row.get(metric)


# BatchNorm + activation saving only its output (mishkit.batchnorm.output), on any device (the
# time and compile targets are in _compile_targets; the bn_act rows report the layer's ratio).
OUTPUT_TARGETS = [
    Target("fuse_bn='output' saved bytes ≤ 0.6× ReLU(inplace)", "memory",
           {"variant": "mishkit_mish_fuse_bn_output"}, "saved_ratio_vs_relu", "<=", 0.6),
]
GPU_TARGETS += OUTPUT_TARGETS
CPU_TARGETS += OUTPUT_TARGETS
