"""benchmarks/gpu_suite.sh on a CPU-only machine: its flow with a stub python, and its stage
definitions against the real tests and benchmark options.

The stub (tests/gpu_suite_stub.py) plays the GPU machine's python3: every stage finishes in
milliseconds and passes, fails, hangs until SIGINT, ignores SIGINT, or loses its junit XML as a
test asks. Time limits are scaled down (MISHKIT_SUITE_TIME_SCALE) so a hang costs a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.run import add_arguments

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
SCALE = "0.03"  # 75 s -> 2.25 s; the budget (470 s -> 14 s) still holds every stage


@pytest.fixture
def stub_python(tmp_path) -> Path:
    wrapper = tmp_path / "python3"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'gpu_suite_stub.py'}"
                       ' "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def run_suite(tmp_path, stub_python, *flags, behaviour=None, missing="", env=None):
    out = tmp_path / "out"
    environment = {**os.environ, "PYTHON": sys.executable, "MISHKIT_SUITE_TIME_SCALE": SCALE,
                   "MISHKIT_SUITE_STAMP": str(tmp_path / "stamp"),
                   "STUB_BEHAVIOUR": json.dumps(behaviour or {}), "STUB_MISSING": missing,
                   **(env or {})}
    done = subprocess.run([str(SUITE), *flags, "--python", str(stub_python), str(out)],
                          capture_output=True, text=True, env=environment, timeout=300)
    summary = (out / "summary.md").read_text()
    return done, out, summary


def stage_statuses(summary: str) -> dict[str, str]:
    rows = [line.split("|") for line in summary.split("## Stages")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    return {cells[2].strip(): cells[3].strip() for cells in rows}


def test_a_clean_full_run_passes_and_leaves_four_files(tmp_path, stub_python):
    done, out, summary = run_suite(tmp_path, stub_python)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_suite.report.OUT_FILES)
    statuses = stage_statuses(summary)
    assert list(statuses.values()) == ["ok"] * 8  # environment, build, stages 1-6
    assert "**ok**" in summary and "RESULT: ok" in done.stdout
    # the targets table comes last on stdout, the measured value winning over "not measured"
    assert done.stdout.rstrip().endswith("RESULT: ok")
    assert "| fused BN+Mish fwd+bwd ≥ 1.3× BN + F.mish | 1.700 | 1.3 | met |" in done.stdout
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert {"junit-1-triton.xml", "junit-6-memcheck.xml", "bench-bandwidth/results.jsonl",
            "bench-layers/summary.md", "environment.json", "build.log"} <= set(names)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["record"] for r in records} >= {"kernel", "copy", "bn_act", "target"}
    log = (out / "suite.log").read_text()
    assert log.index("stub pytest triton") < log.index("stub pytest cuda") \
        < log.index("stub pytest gpu-tests") < log.index("stub pytest memcheck")


def test_quick_runs_the_first_three_stages(tmp_path, stub_python):
    done, _, summary = run_suite(tmp_path, stub_python, "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
    quick = [s.title for s in gpu_suite.stages(rehearsal=False) if s.quick]
    assert list(stage_statuses(summary)) == ["environment", "CUDA build of mishkit._C", *quick]
    assert [s.number for s in gpu_suite.stages(rehearsal=False) if s.quick] == [1, 2, 3]


def test_failures_are_named_and_make_the_run_fail(tmp_path, stub_python):
    done, _, summary = run_suite(tmp_path, stub_python,
                                 behaviour={"cuda": "fail", "bandwidth": "fail"})
    assert done.returncode == 1
    failures = summary.split("## Failures")[1].split("##")[0]
    assert "stage 2 cuda: tests.test_stub::test_broken[mish]: AssertionError" in failures
    assert "kernel mish bf16 forward compile: error: RuntimeError: inductor broke" in failures
    assert "kernel compile bf16 backward: no measured row" in failures
    statuses = stage_statuses(summary)
    assert statuses["all other GPU tests (xdist)"] == "ok"  # later stages still ran
    assert "RESULT: FAILED: 2 cuda (FAILED), 3 bandwidth (FAILED)" in done.stdout


def test_a_stage_past_its_limit_gets_sigint_and_keeps_its_partial_results(tmp_path, stub_python):
    started = time.monotonic()
    done, out, summary = run_suite(tmp_path, stub_python,
                                   behaviour={"triton": "hang", "layers": "hang"})
    assert time.monotonic() - started < 60
    assert done.returncode == 1
    statuses = stage_statuses(summary)
    assert statuses["Triton Mish correctness (extension disabled)"] == "TIME LIMIT"
    assert statuses["BN+act, network, memory and torch.compile network benchmarks"] == "TIME LIMIT"
    assert "2 passed, 0 failed" in summary  # pytest's partial junit, written on SIGINT
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert any(r.get("record") == "bn_act" for r in records)  # rows before the interrupt


def test_a_process_ignoring_sigint_is_killed_and_reported(tmp_path, stub_python):
    done, _, summary = run_suite(tmp_path, stub_python, "--quick",
                                 behaviour={"triton": "stubborn", "cuda": "nojunit"})
    assert done.returncode == 1
    assert "no junit XML (junit-1-triton.xml)" in summary
    assert "no junit XML (junit-2-cuda.xml): pytest exited 3" in summary
    assert stage_statuses(summary)["Mish bandwidth at 2^26 (fp32, bf16)"] == "ok"


def test_build_failure_stale_ids_and_missing_modules_are_named(tmp_path, stub_python):
    done, _, summary = run_suite(tmp_path, stub_python, "--quick", missing="xdist",
                                 behaviour={"build": "fail", "cuda": "notfound",
                                            "triton": "allskipped"})
    assert done.returncode == 1
    assert "python module 'xdist' is missing" in summary
    assert "build: exit 1; see build.log" in summary
    assert "ERROR: not found: tests/test_activations_gpu.py::test_renamed[mish]" in summary
    assert "stage 1 triton: every selected test was skipped" in summary
    assert "- stage 1: 2 × needs compute-sanitizer" in summary


def test_results_are_on_disk_after_every_stage(tmp_path, stub_python):
    # a run cut off mid-way (the lease ends) still leaves the finished stages' evidence
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "MISHKIT_SUITE_TIME_SCALE": "1",
           "MISHKIT_SUITE_STAMP": str(tmp_path / "stamp"),
           "STUB_BEHAVIOUR": json.dumps({"bandwidth": "hang"})}
    process = subprocess.Popen([str(SUITE), "--python", str(stub_python), str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
            if "CUDA Mish correctness + extension GPU tests | ok" in summary:
                break
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    assert "Triton Mish correctness (extension disabled) | ok" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_suite.report.OUT_FILES)


# -- the stage definitions against this checkout -------------------------------------------------


def test_every_stage_test_id_exists_and_runs_once():
    # a renamed test would make a GPU stage select nothing or fail: collect them all here. The
    # catch-all stage 4 deselects what the targeted stages run, so nothing runs twice.
    collected, deselected = {}, {}
    for stage in gpu_suite.stages(rehearsal=False):
        if stage.kind != "pytest":
            continue
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                               "-p", "no:cacheprovider", *stage.args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"stage {stage.key}: {done.stdout[-2000:]}{done.stderr}"
        collected[stage.key] = {line for line in done.stdout.splitlines() if "::" in line}
        after = [b for a, b in zip(stage.args, stage.args[1:]) if a == "--deselect"]
        deselected[stage.key] = {a for a in after if "::" in a}
        named = {a for a in stage.args if "::" in a} - deselected[stage.key]
        assert collected[stage.key], f"stage {stage.key} selects no test"
        assert named <= collected[stage.key], f"stage {stage.key}: {named - collected[stage.key]}"
    targeted = collected["triton"] | collected["cuda"] | collected["memcheck"]
    assert deselected["gpu-tests"] <= targeted  # every deselected id exists (in its own stage)
    assert not collected["gpu-tests"] & targeted
    assert not any(i.startswith("tests/test_extension.py") for i in collected["gpu-tests"])


def test_bench_stage_options_are_valid_harness_options():
    import argparse

    from benchmarks import contenders
    from benchmarks.kernel import KernelGrid

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for rehearsal in (False, True):
        for stage in gpu_suite.stages(rehearsal):
            if stage.kind != "bench":
                continue
            args = parser.parse_args([*stage.args, "--out", "x"])
            if args.contenders:
                assert [c.name for c in contenders.resolve(args.contenders)] == args.contenders
                KernelGrid(args.activations, args.dtypes, args.sizes, args.modes,
                           args.contenders).validate()
                assert stage.expected["contenders"] == args.contenders
