"""A stand-in for the GPU machine's python3, for tests/test_gpu_suite.py.

benchmarks/gpu_suite.py runs every stage as ``PYTHON ...``; with this script as PYTHON the
stages finish in milliseconds and behave as ``STUB_BEHAVIOUR`` says, a JSON object from a stage
key ("build", "triton", "cuda", "bandwidth", "gpu-tests", "layers", "memcheck") to one of: ok,
fail (a failing test / an erroring contender), hang (until SIGINT; pytest then writes a partial
junit XML and exits 2, the harness exits 1 keeping its rows), stubborn (ignores SIGINT), nojunit
(exits 3 without a junit XML), notfound (a stale test id: exit 4), allskipped (every test
skips, as without compute-sanitizer). ``STUB_MISSING``: modules the
environment probe reports missing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

BEHAVIOUR = json.loads(os.environ.get("STUB_BEHAVIOUR", "{}"))


def behaviour(key: str) -> str:
    return BEHAVIOUR.get(key, "ok")


def wait_for_sigint(on_interrupt) -> None:
    signal.signal(signal.SIGINT, lambda *_: (on_interrupt(), sys.exit(2)))
    time.sleep(120)
    sys.exit(9)  # never reached in the tests: the suite interrupts first


def stubborn() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(120)


def junit(path: Path, passed: int, failed: list[str], skipped: int = 0) -> None:
    cases = [f'<testcase classname="tests.test_stub" name="test_ok_{i}" time="0.01"/>'
             for i in range(passed)]
    cases += [f'<testcase classname="tests.test_stub" name="{name}" time="0.01">'
              f'<failure message="AssertionError: {name} went wrong">trace</failure></testcase>'
              for name in failed]
    cases += [f'<testcase classname="tests.test_stub" name="test_skip_{i}" time="0">'
              '<skipped message="needs compute-sanitizer"/></testcase>' for i in range(skipped)]
    total = passed + len(failed) + skipped
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{total}" '
                    f'failures="{len(failed)}" errors="0" skipped="{skipped}">'
                    + "".join(cases) + "</testsuite></testsuites>")


def pytest(args: list[str]) -> int:
    path = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")))
    key = path.stem.split("-", 2)[2]  # junit-<number>-<key>
    mode = behaviour(key)
    print(f"stub pytest {key}: {mode}")
    if mode == "hang":
        wait_for_sigint(lambda: junit(path, 2, []))
    if mode == "stubborn":
        stubborn()
    if mode == "nojunit":
        return 3
    if mode == "notfound":
        print("ERROR: not found: tests/test_activations_gpu.py::test_renamed[mish]")
        return 4
    if mode == "allskipped":
        junit(path, 0, [], skipped=2)
        return 0
    junit(path, 3, ["test_broken[mish]"] if mode == "fail" else [], skipped=1)
    return 1 if mode == "fail" else 0


def bench(args: list[str]) -> int:
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    key = "bandwidth" if "kernel" in args[args.index("--suites") + 1] else "layers"
    mode = behaviour(key)
    rows = [{"record": "meta", "device": "Stub GPU"}]
    if key == "bandwidth":
        contenders = args[args.index("--contenders") + 1].split(",")
        rows.append({"record": "copy", "dtype": "fp32", "log2_numel": 26, "gbps": 4300.0})
        for contender in contenders:
            for dtype in ("fp32", "bf16"):
                for mode_name in ("forward", "backward", "forward+backward"):
                    broken = mode == "fail" and contender == "compile" and dtype == "bf16"
                    rows.append({"record": "kernel", "activation": "mish", "dtype": dtype,
                                 "mode": mode_name, "contender": contender, "log2_numel": 26,
                                 "status": "error" if broken else "ok",
                                 "reason": "RuntimeError: inductor broke" if broken else None})
        rows.append({"record": "target", "target": "Mish forward fp32 ≥ 90% of copy bandwidth",
                     "value": 0.93, "threshold": 0.9, "status": "met"})
        rows.append({"record": "target", "target": "fused BN+Mish fwd+bwd ≥ 1.3× BN + F.mish",
                     "value": None, "threshold": 1.3, "status": "not measured (row not in run)"})
    else:
        rows.append({"record": "bn_act", "activation": "mish", "dtype": "fp32",
                     "variant": "BatchNormAct2d", "status": "ok"})
        rows.append({"record": "target", "target": "fused BN+Mish fwd+bwd ≥ 1.3× BN + F.mish",
                     "value": 1.7, "threshold": 1.3, "status": "met"})
    with (out / "results.jsonl").open("w") as f:
        for row in rows[:2] if mode == "hang" else rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        if mode == "hang":
            wait_for_sigint(lambda: None)
    (out / "summary.md").write_text(f"# stub {key}\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["-c"]:  # the environment probe
        missing = [m for m in os.environ.get("STUB_MISSING", "").split(",") if m]
        print(json.dumps({"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0",
                          "cuda_device": True, "device": "Stub GPU", "capability": "sm_90",
                          "multiprocessors": 132, "triton": "3.6.0", "nvcc": ["13.0"],
                          "missing_modules": missing, "nvcc_flags": ["-D__CUDA_NO_HALF_OPS__"]}))
        return 0
    if argv[:1] == ["setup.py"]:
        mode = behaviour("build")
        print(f"stub build: {mode}")
        if mode == "hang":
            wait_for_sigint(lambda: None)
        return 1 if mode == "fail" else 0
    if argv[:2] == ["-m", "pytest"]:
        return pytest(argv[2:])
    if argv[:2] == ["-m", "benchmarks"]:
        return bench(argv[2:])
    print(f"stub python: unexpected arguments {argv}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
