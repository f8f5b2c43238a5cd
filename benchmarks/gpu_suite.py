"""The GPU evidence run behind ``benchmarks/gpu_suite.sh [--quick] OUTDIR``, in stages.

GPU time comes in short slots that can be cut off, and only a few files come back, so the run
is ordered by the value of its evidence and writes it as it goes:

0. environment (versions, the GPU, compilers, missing packages), then the CUDA build of
   mishkit._C starts in the background (``TORCH_CUDA_ARCH_LIST=9.0``, ``MAX_JOBS=14``);
1. meanwhile: Triton Mish forward/backward in every dtype, misaligned, > 2^31 elements, streams
   (extension disabled: the build is writing it);
2. the CUDA backend's Mish correctness and the extension's GPU tests (after the build);
3. bandwidth at 2^26: Mish forward / backward / both, fp32 and bf16, cuda, triton, native, naive
   and torch.compile against a same-run copy;                                  (``--quick``: 0-3)
4. every other GPU test, in parallel (pytest-xdist), Triton compiled on CUDA included;
5. the BN+act, network, memory and torch.compile network benchmarks;
6. compute-sanitizer memcheck (and racecheck of the BN reductions), last.

Each stage has a time limit, sent as SIGINT (pytest still prints its summary and writes its
junit XML, the benchmark harness keeps the rows it wrote), and the whole run an overall budget
(``--quick`` 235 s, full 470 s) that later stages share. After every stage OUTDIR holds four
files, whatever happens next: ``summary.md`` (stages, failures, the targets table), ``suite.log``
(everything the stages printed), ``results.jsonl`` (all benchmark records) and ``results.tar.gz``
(junit XML, the benchmark folders with their summaries and plots, the build log, the
environment). Any stage that fails, times out or finds a failing test, an erroring or missing
contender, or a suite error makes the exit status non-zero and is named in the summary.

``--rehearsal`` runs the same flow on a CPU-only machine: the pytest stages only collect their
tests (a stale test id fails), the benchmarks run a tiny CPU grid and the build is the CPU one,
so CI checks the stage definitions without a GPU. ``--python`` picks the interpreter the stages
run (tests use a stub to check the flow itself).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu_suite_report as report

REPO = Path(__file__).resolve().parents[1]
# MISHKIT_SUITE_TIME_SCALE multiplies every limit below (a slower GPU; the flow tests' stubs)
TIME_SCALE = float(os.environ.get("MISHKIT_SUITE_TIME_SCALE", "1"))
BUDGET_S = {"quick": 235 * TIME_SCALE, "full": 470 * TIME_SCALE}
BUILD_LIMIT_S = 240 * TIME_SCALE
GRACE_S = 20 * TIME_SCALE  # after SIGINT, before SIGKILL
MIN_STAGE_S = 5 * TIME_SCALE  # a stage with less time left is not started
STAMP = Path(os.environ.get("MISHKIT_SUITE_STAMP", REPO / "build" / "gpu-suite.stamp"))
DTYPE_IDS = ("torch.float64", "torch.float32", "torch.float16", "torch.bfloat16")
REQUIRED_MODULES = ("torch", "triton", "numpy", "yaml", "PIL", "tqdm", "matplotlib", "pytest",
                    "pytest_timeout", "xdist", "hypothesis")


def _activation_ids(backend: str) -> list[str]:
    """tests/test_activations_gpu.py's Mish tests of one backend, as pytest node ids."""
    f = "tests/test_activations_gpu.py::"
    return [*(f"{f}test_forward_and_backward_match_float64_reference[mish-{d}-{backend}]"
              for d in DTYPE_IDS),
            f"{f}test_gradcheck_and_gradgradcheck[mish-{backend}]",
            f"{f}test_misaligned_and_odd_sizes_and_channels_last[{backend}]",
            f"{f}test_tensor_over_2_pow_31_elements_bf16[{backend}]",
            f"{f}test_mixed_streams[{backend}]"]


CUDA_IDS = [*_activation_ids("cuda"), "tests/test_activations_gpu.py::test_opcheck_cuda_ops[mish]",
            "tests/test_activations_gpu.py::test_device_mismatch_is_a_clear_error"]
MEMCHECK_IDS = ["tests/test_activations_gpu.py::test_compute_sanitizer_memcheck",
                "tests/test_bn_act.py::test_compute_sanitizer_bn_act"]
BANDWIDTH = ["--suites", "kernel", "--activations", "mish", "--dtypes", "fp32,bf16",
             "--sizes", "26", "--modes", "forward,backward,forward+backward",
             "--contenders", "mishkit-cuda,mishkit-triton,native,naive,compile",
             "--compile-activations", "mish"]
# what stage 3 must measure: every (dtype, mode) for each of these contenders
BANDWIDTH_EXPECTED = {"contenders": ["mishkit-cuda", "mishkit-triton", "native", "naive",
                                     "compile"],
                      "dtypes": ["fp32", "bf16"], "modes": ["forward", "backward",
                                                            "forward+backward"]}


@dataclass(frozen=True)
class Stage:
    number: int
    key: str
    title: str
    kind: str  # "pytest" or "bench"
    limit_s: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs_build: bool = True
    quick: bool = False
    test_timeout_s: int = 60
    workers: int = 0  # pytest-xdist processes (0: none)
    expected: dict | None = None  # bench: rows that must be there


def stages(rehearsal: bool) -> list[Stage]:
    no_ext = {"MISHKIT_DISABLE_EXT": "1", "MISHKIT_TRITON_AUTOTUNE": "0"}
    fixed = {"MISHKIT_TRITON_AUTOTUNE": "0"}  # correctness runs: one config, no tuning sweeps
    device = ["--preset", "gpu", "--device", "cuda"]
    bandwidth, expected = BANDWIDTH, BANDWIDTH_EXPECTED
    if rehearsal:  # the same harness path on a tiny CPU grid
        device = ["--smoke", "--device", "cpu"]
        bandwidth = [*BANDWIDTH[:BANDWIDTH.index("--sizes")], "--sizes", "12", "--modes",
                     "forward,backward,forward+backward", "--contenders",
                     "mishkit-cpu,native,naive"]
        expected = {**BANDWIDTH_EXPECTED, "contenders": ["mishkit-cpu", "native", "naive"]}
    return [
        Stage(1, "triton", "Triton Mish correctness (extension disabled)", "pytest", 75,
              ["-m", "gpu", *_activation_ids("triton")], no_ext, needs_build=False, quick=True),
        Stage(2, "cuda", "CUDA Mish correctness + extension GPU tests", "pytest", 50,
              ["-m", "gpu", "tests/test_extension.py", *CUDA_IDS], fixed, quick=True),
        Stage(3, "bandwidth", "Mish bandwidth at 2^26 (fp32, bf16)", "bench", 100,
              [*device, *bandwidth], quick=True, expected=expected),
        Stage(4, "gpu-tests", "all other GPU tests (xdist)", "pytest", 100,
              ["-m", "gpu or triton", "tests", "--ignore", "tests/segmentation",  # no GPU tests
               "--deselect", "tests/test_extension.py",
               *(a for i in (*_activation_ids("triton"), *CUDA_IDS, *MEMCHECK_IDS)
                 for a in ("--deselect", i))],
              fixed, test_timeout_s=90, workers=8),
        Stage(5, "layers", "BN+act, network, memory and torch.compile network benchmarks",
              "bench", 140, [*device, "--suites", "bn_act,network,memory,compile"]),
        Stage(6, "memcheck", "compute-sanitizer memcheck / racecheck", "pytest", 55,
              ["-m", "gpu", *MEMCHECK_IDS], fixed, test_timeout_s=55),
    ]


class Run:
    """One suite run: the work folder, the overall deadline, the background build."""

    def __init__(self, out: Path, mode: str, python: str, rehearsal: bool):
        self.out, self.mode, self.python, self.rehearsal = out, mode, python, rehearsal
        self.work = out.parent / f".{out.name}.work"  # beside OUT: OUT holds only OUT_FILES
        shutil.rmtree(self.work, ignore_errors=True)  # nothing of an earlier run gets packed
        self.work.mkdir(parents=True)
        self.started = time.monotonic()
        self.deadline = self.started + BUDGET_S[mode]
        self.results: list[dict] = []
        self.build: subprocess.Popen | None = None
        self.build_result: dict | None = None
        self.log = (self.work / "suite.log").open("a")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, line: str) -> None:
        text = f"[{self.elapsed():5.0f} s] {line}"
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        if self.rehearsal:
            env.setdefault("TRITON_INTERPRET", "1")
        return env

    # -- stage 0 ------------------------------------------------------------------------------

    def environment(self) -> None:
        started = time.monotonic()
        try:
            done = subprocess.run([self.python, "-c", report.ENVIRONMENT_PROBE,
                                   *REQUIRED_MODULES], cwd=REPO, capture_output=True, text=True,
                                  env=self.env({}), timeout=120)
            stdout, stderr, rc = done.stdout, done.stderr, done.returncode
        except (OSError, subprocess.SubprocessError) as exc:
            stdout, stderr, rc = "", f"{type(exc).__name__}: {exc}", -1
        info = report.parse_environment(stdout)
        (self.work / "environment.json").write_text(json.dumps(info))
        self.log.write(stdout + stderr)
        missing = info.get("missing_modules", [])
        failures = [] if rc == 0 else [f"probe exited {rc}: {stderr.strip()[-300:]}"]
        failures += [f"python module {m!r} is missing (carry its wheel: README, GPU section)"
                     for m in missing]
        if not self.rehearsal and not info.get("cuda_device"):
            failures.append("torch sees no CUDA device")
        self.results.append({"number": 0, "key": "environment", "title": "environment",
                             "status": "ok" if not failures else "FAILED",
                             "seconds": time.monotonic() - started, "limit_s": 120,
                             "detail": report.environment_line(info), "failures": failures})
        self.say(f"environment: {report.environment_line(info)}")

    # -- the build ----------------------------------------------------------------------------

    def build_stamp(self) -> str:
        digest = hashlib.sha256()
        for path in sorted([REPO / "setup.py", *(REPO / "csrc").rglob("*")]):
            if path.is_file():
                digest.update(path.read_bytes())
        digest.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").encode())
        digest.update(b"rehearsal" if self.rehearsal else b"cuda")
        return digest.hexdigest()

    def start_build(self) -> None:
        built = list((REPO / "mishkit").glob("_C*.so"))
        if built and STAMP.exists() and STAMP.read_text() == self.build_stamp():
            self.build_result = {"status": "ok", "detail": "reused (sources unchanged)",
                                 "seconds": 0.0, "failures": []}
            self.results.append({"number": 0, "key": "build", "title": "CUDA build of mishkit._C",
                                 "limit_s": round(BUILD_LIMIT_S), **self.build_result})
            self.say("build: reusing mishkit._C (sources unchanged)")
            return
        env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "14"), "MISHKIT_CUDA": "1",
               "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
        argv = [self.python, "setup.py", "build_ext", "--inplace"]
        if self.rehearsal:  # CI built the CPU extension already: check that it loads
            env, argv = {}, [self.python, "-c", "import mishkit._C"]
        self.build_log = (self.work / "build.log").open("w")
        self.build = subprocess.Popen(argv,
                                      cwd=REPO, env=self.env(env), stdout=self.build_log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.build_started = time.monotonic()
        settings = " ".join(f"{k}={v}" for k, v in env.items())
        self.say(f"build: started in the background ({settings})")

    def wait_build(self) -> dict:
        if self.build_result is not None:
            return self.build_result
        left = max(1.0, BUILD_LIMIT_S - (time.monotonic() - self.build_started))
        rc, timed_out = _wait(self.build, left)
        seconds = time.monotonic() - self.build_started
        self.build_log.close()
        tail = (self.work / "build.log").read_text(errors="replace")[-4000:]
        self.log.write("\n==== build log (tail) ====\n" + tail + "\n")
        if rc == 0:
            STAMP.parent.mkdir(parents=True, exist_ok=True)
            STAMP.write_text(self.build_stamp())
        status = "ok" if rc == 0 else "FAILED"
        detail = "mishkit._C built" if rc == 0 else (
            f"time limit {BUILD_LIMIT_S:.0f} s hit" if timed_out else f"exit {rc}; see build.log")
        self.build_result = {"status": status, "detail": detail, "seconds": seconds,
                             "failures": [] if rc == 0 else [f"build: {detail}"]}
        self.results.append({"number": 0, "key": "build", "title": "CUDA build of mishkit._C",
                             "limit_s": round(BUILD_LIMIT_S), **self.build_result})
        self.say(f"build: {status} ({detail}, {seconds:.0f} s)")
        return self.build_result

    # -- stages 1-6 ---------------------------------------------------------------------------

    def command(self, stage: Stage) -> tuple[list[str], Path]:
        if stage.kind == "bench":
            folder = self.work / f"bench-{stage.key}"
            return [self.python, "-m", "benchmarks", *stage.args, "--out", str(folder)], folder
        junit = self.work / f"junit-{stage.number}-{stage.key}.xml"
        argv = [self.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                f"--junitxml={junit}", "-o", "junit_family=xunit2"]
        if self.rehearsal:
            argv.append("--collect-only")
        else:
            argv += [f"--timeout={stage.test_timeout_s}"]
            if stage.workers:
                argv += ["-n", str(stage.workers)]
        return [*argv, *stage.args], junit

    def run_stage(self, stage: Stage) -> None:
        if stage.needs_build:
            self.wait_build()
        limit = min(stage.limit_s * TIME_SCALE, self.deadline - time.monotonic())
        if limit < MIN_STAGE_S:
            self.results.append({"number": stage.number, "key": stage.key, "title": stage.title,
                                 "status": "NOT RUN", "seconds": 0.0,
                                 "limit_s": round(stage.limit_s * TIME_SCALE),
                                 "detail": "the run's overall budget was spent",
                                 "failures": [f"stage {stage.number} not run: budget spent"]})
            self.say(f"stage {stage.number} {stage.key}: NOT RUN (budget spent)")
            return
        argv, artefact = self.command(stage)
        self.say(f"stage {stage.number} {stage.key}: {stage.title} (limit {limit:.0f} s)")
        stage_log = self.work / f"stage-{stage.number}-{stage.key}.log"
        started = time.monotonic()
        with stage_log.open("w") as output:
            output.write("$ " + " ".join(argv) + "\n")
            output.flush()
            process = subprocess.Popen(argv, cwd=REPO, env=self.env(stage.env), stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            rc, timed_out = _wait(process, limit)
        seconds = time.monotonic() - started
        text = stage_log.read_text(errors="replace")
        stage_log.unlink()  # its text goes to suite.log, one file for every stage
        self.log.write(text)
        if stage.kind == "pytest":
            outcome = report.pytest_outcome(artefact, rc, timed_out, limit, self.rehearsal, text)
        else:
            outcome = report.bench_outcome(artefact, rc, timed_out, limit, stage.expected)
        self.results.append({"number": stage.number, "key": stage.key, "title": stage.title,
                             "seconds": seconds, "limit_s": round(limit), **outcome})
        self.say(f"stage {stage.number} {stage.key}: {outcome['status']} "
                 f"({outcome['detail']}, {seconds:.0f} s)")

    def publish(self) -> tuple[int, str]:
        """Write the four files of OUTDIR from what the work folder holds now."""
        self.log.flush()
        return report.publish(self.work, self.out, self.results, self.mode, self.elapsed(),
                              BUDGET_S[self.mode], self.rehearsal)


def _wait(process: subprocess.Popen, limit: float) -> tuple[int, bool]:
    """The exit status; past ``limit``: SIGINT, then SIGKILL for the group after GRACE_S."""
    try:
        return process.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # pytest: summary + junit; harness: rows kept
        try:
            return process.wait(timeout=GRACE_S), True
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait(), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_suite.sh", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="stages 0-3 only (~4 min)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="the flow on a CPU-only machine (collect tests, tiny CPU benchmarks)")
    parser.add_argument("--python", default=os.environ.get("PYTHON", "python3"),
                        help="interpreter the stages run (default: $PYTHON or python3)")
    parser.add_argument("out", type=Path, help="folder for the four result files")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, "quick" if args.quick else "full", args.python, args.rehearsal)
    run.say(f"mishkit GPU suite, {run.mode} run{' (rehearsal on CPU)' if args.rehearsal else ''}"
            f": budget {BUDGET_S[run.mode]} s, results in {out}")
    try:
        run.environment()
        run.start_build()
        run.publish()
        for stage in stages(args.rehearsal):
            if run.mode == "quick" and not stage.quick:
                break
            run.run_stage(stage)
            run.publish()
        if run.build is not None and run.build_result is None:
            run.wait_build()
    except BaseException as exc:  # the run itself broke (or was interrupted): say so, loudly
        run.results.append({"number": 99, "key": "suite", "title": "the suite itself",
                            "status": "FAILED", "seconds": run.elapsed(), "limit_s": 0,
                            "detail": f"{type(exc).__name__}: {exc}",
                            "failures": [f"the suite stopped: {type(exc).__name__}: {exc}"]})
        if run.build is not None and run.build.poll() is None:
            os.killpg(run.build.pid, signal.SIGKILL)
    code, table = run.publish()
    print(table, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
