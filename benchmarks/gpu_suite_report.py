"""What :mod:`benchmarks.gpu_suite` makes of its stages: outcomes, the summary and the packing.

Standard library only: the orchestrator must not import torch or mishkit (mishkit._C is being
built beside it, and a broken install must still produce a summary saying so).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

OUT_FILES = ("summary.md", "suite.log", "results.jsonl", "results.tar.gz")

# Run with the stages' python: prints one JSON line describing the machine.
ENVIRONMENT_PROBE = r"""
import importlib.util, json, os, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "missing_modules": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]}
def run(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_device=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    from torch.utils import cpp_extension
    info.update(cuda_home=cpp_extension.CUDA_HOME,
                nvcc_flags=list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])))
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton_error"] = f"{type(exc).__name__}: {exc}"
info["nvcc"] = run("nvcc", "--version").splitlines()[-1:] if shutil.which("nvcc") else None
info["compute_sanitizer"] = shutil.which("compute-sanitizer")
info["driver"] = run("nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm",
                     "--format=csv,noheader") if shutil.which("nvidia-smi") else None
info["cpus"] = os.cpu_count()
print(json.dumps(info))
"""


def parse_environment(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def environment_line(info: dict) -> str:
    if not info:
        return "environment probe printed nothing"
    device = info.get("device") or ("no CUDA device" if "torch" in info else "torch not importable")
    if info.get("capability"):
        device += f" ({info['capability']}, {info.get('multiprocessors')} SMs)"
    parts = [device, f"torch {info.get('torch')} (CUDA {info.get('cuda')})",
             f"triton {info.get('triton', info.get('triton_error'))}",
             f"python {info.get('python')}", f"nvcc {' '.join(info.get('nvcc') or ['none'])}"]
    return ", ".join(parts)


# -- stage outcomes ------------------------------------------------------------------------------


def _limit_hit(limit: float) -> str:
    return f"time limit {limit:.0f} s hit (SIGINT): partial"


def pytest_outcome(junit: Path, rc: int, timed_out: bool, limit: float, rehearsal: bool,
                   output: str = "") -> dict:
    """Status, a one-line detail and the failed / skipped tests of one pytest stage; ``output``
    (what pytest printed) supplies the reason of usage and collection errors."""
    counts, failed, skipped = _junit(junit)
    failures = [f"{name}: {message}" for name, message in failed]
    if rc not in (0, 1, 5) and not timed_out:
        failures += [line.strip()[:300] for line in output.splitlines()
                     if line.startswith(("ERROR", "E   ", "INTERNALERROR"))][:10]
    if counts is None:
        failures.append(f"no junit XML ({junit.name}): pytest exited {rc} before writing it")
    if rehearsal:
        detail = "tests collected (rehearsal)" if rc == 0 else f"collection failed (exit {rc})"
    elif counts is None:
        detail = f"exit {rc}, no junit XML"
    else:
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        detail = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped")
        if counts["tests"] and counts["tests"] == counts["skipped"]:  # on the GPU machine
            failures.append("every selected test was skipped: nothing was checked")
    if timed_out:
        status, detail = "TIME LIMIT", f"{_limit_hit(limit)}; {detail}"
        failures.append(_limit_hit(limit))
    elif rc == 5:
        status = "FAILED"
        failures.append("no tests selected (stale test ids or markers?)")
    elif rc != 0:
        status = "FAILED"
        if not failures:
            failures.append(f"pytest exited {rc} (usage or internal error: see suite.log)")
    else:
        status = "ok" if not failures else "FAILED"
    return {"status": status, "detail": detail, "failures": failures, "skipped": skipped}


def _junit(path: Path):
    """(counts, [(test, message)] failed or errored, [(test, reason)] skipped) or (None, ...)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None, [], []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for element in case.findall(tag):
                message = (element.get("message") or element.text or tag).strip()
                failed.append((name, message.splitlines()[0][:300] if message else tag))
        for element in case.findall("skipped"):
            skipped.append((name, (element.get("message") or "").strip()[:200]))
    return counts, failed, skipped


def read_records(path: Path) -> list[dict]:
    """The harness's JSON lines; a line cut off by a kill is dropped, not fatal."""
    records = []
    try:
        text = path.read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


MEASURED = ("kernel", "bn_act", "network", "memory")


def bench_outcome(folder: Path, rc: int, timed_out: bool, limit: float,
                  expected: dict | None) -> dict:
    """Status and failures of one benchmark stage: errored / unavailable / missing rows."""
    records = read_records(folder / "results.jsonl")
    rows = [r for r in records if r.get("record") in MEASURED]
    failures = [f"suite {r.get('suite')} stopped: {r.get('reason')}" for r in records
                if r.get("record") == "suite_error"]
    for r in rows:
        if r.get("status") != "ok":
            what = " ".join(str(r.get(k)) for k in ("record", "activation", "dtype", "mode",
                                                    "contender", "variant") if r.get(k))
            failures.append(f"{what}: {r.get('status')}: {r.get('reason')}")
    if expected:
        found = {(r.get("contender"), r.get("dtype"), r.get("mode")) for r in rows
                 if r.get("record") == "kernel" and r.get("status") == "ok"}
        for contender in expected["contenders"]:
            for dtype in expected["dtypes"]:
                for mode in expected["modes"]:
                    if (contender, dtype, mode) not in found:
                        failures.append(f"kernel {contender} {dtype} {mode}: no measured row")
    if not rows and not failures:
        failures.append("no benchmark rows were written")
    copies = [r for r in records if r.get("record") == "copy"]
    detail = f"{sum(r.get('status') == 'ok' for r in rows)}/{len(rows)} rows ok"
    if copies:
        detail += ", copy " + ", ".join(f"{c['dtype']} 2^{c['log2_numel']} {c['gbps']:.0f} GB/s"
                                        for c in copies)
    if timed_out:
        status, detail = "TIME LIMIT", f"{_limit_hit(limit)}; {detail}"
        failures.append(_limit_hit(limit))
    elif rc != 0:
        status = "FAILED"
        failures.append(f"the harness exited {rc} (see suite.log)")
    else:
        status = "ok" if not failures else "FAILED"
    return {"status": status, "detail": detail, "failures": failures}


# -- summary and packing -------------------------------------------------------------------------


def targets(records: list[dict]) -> list[dict]:
    """One row per target: the measured one where any bench stage measured it."""
    best: dict[str, dict] = {}
    for r in records:
        if r.get("record") != "target":
            continue
        known = best.get(r["target"])
        if known is None or (known["value"] is None and r.get("value") is not None):
            best[r["target"]] = r
    return list(best.values())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows)]


def targets_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no targets evaluated: the benchmark stages did not finish)"]
    return _table(["target", "measured", "threshold", "status"],
                  [[t["target"], "–" if t.get("value") is None else f"{t['value']:.3f}",
                    f"{t['threshold']:.3g}", t["status"]] for t in rows])


def render(results: list[dict], records: list[dict], environment: dict, mode: str,
           elapsed: float, budget: float, rehearsal: bool) -> tuple[int, str, str]:
    """(exit code, summary.md text, the short table printed last)."""
    failed = [r for r in results if r["status"] != "ok"]
    verdict = "ok" if not failed else "FAILED: " + ", ".join(
        f"{r['number']} {r['key']} ({r['status']})" for r in failed)
    stage_rows = [[str(r["number"]), r["title"], r["status"],
                   f"{r['seconds']:.0f} / {r['limit_s']} s", r.get("detail", "")]
                  for r in results]
    target_rows = targets(records)
    lines = [f"# mishkit GPU suite ({mode}{', rehearsal on CPU' if rehearsal else ''}): "
             f"{environment.get('device', 'no CUDA device')}", "",
             f"- {environment_line(environment)}",
             f"- driver: {environment.get('driver')}; compute-sanitizer: "
             f"{environment.get('compute_sanitizer')}; nvcc flags from torch: "
             f"{' '.join(environment.get('nvcc_flags', []))}",
             f"- wall time {elapsed:.0f} s of a {budget:.0f} s budget; result: **{verdict}**", "",
             "## Stages", "", *_table(["#", "stage", "status", "time / limit", "result"],
                                      stage_rows), ""]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            lines += [f"- stage {r['number']} {r['key']}: {item}" for item in r["failures"]]
        lines.append("")
    skipped = [(r["number"], *s) for r in results for s in r.get("skipped", [])]
    if skipped:
        reasons: dict[tuple, int] = {}
        for number, _, reason in skipped:
            reasons[(number, reason)] = reasons.get((number, reason), 0) + 1
        lines += ["## Skipped tests", "",
                  *(f"- stage {n}: {count} × {reason}" for (n, reason), count in reasons.items()),
                  ""]
    slug = re.sub(r"[^a-z0-9]+", "-", str(environment.get("device", "device")).lower())
    lines += ["## Targets", "", *targets_table(target_rows), "",
              "Files: summary.md, suite.log (all stage output), results.jsonl (every benchmark "
              "record), results.tar.gz (junit XML, benchmark folders with summary.md and PNGs, "
              "build log, environment.json). To commit: unpack the bench-* folders into "
              f"benchmarks/results/{slug.strip('-')}/ and update README's GPU targets table.", ""]
    short = ["", "## mishkit GPU suite: stages", "",
             *_table(["#", "stage", "status", "time"], [row[:4] for row in stage_rows]), "",
             "## Targets", "", *targets_table(target_rows), "", f"RESULT: {verdict}"]
    return (0 if not failed else 1), "\n".join(lines), "\n".join(short)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def publish(work: Path, out: Path, results: list[dict], mode: str, elapsed: float, budget: float,
            rehearsal: bool) -> tuple[int, str]:
    """Write OUT_FILES from the work folder; returns (exit code, the short final table)."""
    records = []
    for path in sorted(work.glob("bench-*/results.jsonl")):
        records += read_records(path)
    environment = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        environment = json.loads((work / "environment.json").read_text() or "{}")
    ordered = sorted(results, key=lambda r: r["number"])
    code, summary, short = render(ordered, records, environment, mode, elapsed, budget, rehearsal)
    _write_atomic(out / "summary.md", (summary + "\n").encode())
    _write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    _write_atomic(out / "suite.log", (work / "suite.log").read_bytes())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.name != "suite.log":
                tar.add(path, arcname=str(path.relative_to(work)))
    _write_atomic(out / "results.tar.gz", buffer.getvalue())
    return code, short
