"""The benchmark harness: a tiny in-process run through the whole path, and its arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import contenders, layers, report, timing
from benchmarks.kernel import KernelGrid, run_kernel_grid
from benchmarks.run import main, parse_networks, parse_sizes
from mishkit import backends
from mishkit.__main__ import main as mishkit_main
from mishkit.registry import get_spec

REPO_ROOT = Path(__file__).resolve().parents[1]

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
ELEMENTS = {"forward": 2, "backward": 3, "forward+backward": 5}  # elements moved per mode


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["--smoke", "--out", str(out), "--activations", "mish,relu",
                 "--dtypes", "fp32,bf16", "--sizes", "10,12", "--suites", "kernel,bn_act,memory",
                 "--contenders",
                 "mishkit-cuda,mishkit-cpu,mishkit-torch,native,naive,compile,relu"])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, records


def test_run_writes_results_summary_and_plots(tiny_run):
    out, records = tiny_run
    for name in ("results.jsonl", "summary.md", "bandwidth_mish.png", "bandwidth_relu.png",
                 "speedup.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    meta = records[0]
    assert meta["record"] == "meta"
    assert meta["torch"] == torch.__version__ and meta["device_type"] == "cpu"
    for key in ("device", "cuda", "triton", "git_commit", "date", "load_average_start"):
        assert key in meta
    assert meta["cpu_malloc"].startswith("glibc malloc")  # thresholds fixed for CPU runs
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "CPU Mish forward fp32 2^22" in summary


def test_every_case_has_every_mode_and_contender(tiny_run):
    _, records = tiny_run
    kernel = [r for r in records if r["record"] == "kernel"]
    keys = {(r["activation"], r["dtype"], r["log2_numel"], r["mode"], r["contender"])
            for r in kernel}
    assert len(keys) == len(kernel) == 2 * 2 * 2 * 3 * 7


def test_rows_report_consistent_bandwidth_and_speedups(tiny_run):
    _, records = tiny_run
    # on CPU the copy is timed with each case, in its rounds
    copies = {(r["activation"], r["dtype"], r["numel"]): r for r in records
              if r["record"] == "copy"}
    ok = [r for r in records if r["record"] == "kernel" and r["status"] == "ok"]
    assert ok
    for row in ok:
        numel = 2 ** row["log2_numel"]
        assert row["numel"] == numel
        assert row["bytes_moved"] == ELEMENTS[row["mode"]] * numel * ITEMSIZE[row["dtype"]]
        seconds = row["time_ms_median"] * 1e-3
        assert row["gbps"] == pytest.approx(row["bytes_moved"] / seconds / 1e9)
        copy = copies[row["activation"], row["dtype"], numel]
        assert len(copy["time_ms_rounds"]) == len(row["time_ms_rounds"]) > 1
        assert copy["bytes_moved"] == 2 * numel * ITEMSIZE[row["dtype"]]
        assert row["copy_gbps"] == pytest.approx(copy["gbps"])
        # the copy's time over this row's, round by round, scaled by the bytes each moves
        copy_per_round = np.array(copy["time_ms_rounds"]) / np.array(row["time_ms_rounds"])
        assert row["copy_ratio"] == pytest.approx(
            row["bytes_moved"] / copy["bytes_moved"] * np.median(copy_per_round))
        assert row["time_ms_p20"] <= row["time_ms_median"] <= row["time_ms_p80"]
        same = {r["contender"]: r for r in ok if (r["activation"], r["dtype"], r["numel"],
                r["mode"]) == (row["activation"], row["dtype"], numel, row["mode"])}
        for baseline, ratio in row["speedup"].items():
            # the median and p20-p80 of the per-round ratios, each round timed side by side
            per_round = (np.array(same[baseline]["time_ms_rounds"])
                         / np.array(row["time_ms_rounds"]))
            assert ratio == pytest.approx(np.median(per_round))
            assert row["speedup_spread"][baseline] == pytest.approx(
                np.percentile(per_round, [20, 80]))
            low_rank, high_rank = timing.median_interval_ranks(len(per_round))
            ordered = sorted(per_round)
            assert row["speedup_ci95"][baseline] == pytest.approx(
                [ordered[low_rank], ordered[high_rank]])
        assert set(row["speedup"]) == {"native", "naive", "relu"}  # compile is off in smoke


def test_saved_bytes_match_what_each_contender_keeps(tiny_run):
    _, records = tiny_run
    rows = {(r["activation"], r["dtype"], r["numel"], r["contender"]): r for r in records
            if r["record"] == "kernel" and r["status"] == "ok"}
    for (activation, dtype, numel, contender), row in rows.items():
        x_bytes = numel * ITEMSIZE[dtype]
        if contender in ("mishkit-cpu", "mishkit-torch", "native", "relu"):
            assert row["saved_bytes"] == x_bytes  # input (or ReLU's output) only
        if contender == "naive" and activation == "mish":
            assert row["saved_bytes"] > x_bytes  # x, softplus, tanh: several tensors


def test_unavailable_contenders_carry_the_backend_reason(tiny_run):
    _, records = tiny_run
    cuda_rows = [r for r in records if r["record"] == "kernel" and r["contender"] == "mishkit-cuda"]
    expected = backends.unavailable_reason("cuda", torch.device("cpu"))
    assert expected is not None
    assert cuda_rows and all(r["status"] == "unavailable" and r["reason"] == expected
                             for r in cuda_rows)
    compile_rows = [r for r in records if r["record"] == "kernel" and r["contender"] == "compile"]
    assert all(r["status"] == "unavailable" and "--compile-activations" in r["reason"]
               for r in compile_rows)


def test_memory_table_has_the_variants_in_order(tiny_run):
    from mishkit.memory import mish_variants

    _, records = tiny_run
    memory = [r for r in records if r["record"] == "memory"]
    assert memory[0]["variant"] == "relu_inplace"
    assert [r["variant"] for r in memory] == list(mish_variants())
    ok = {r["variant"]: r for r in memory if r["status"] == "ok"}
    base = ok["relu_inplace"]["saved_bytes"]
    for row in ok.values():
        assert row["saved_ratio_vs_relu"] == pytest.approx(row["saved_bytes"] / base)
    if "naive_mish" in ok and "torch_mish" in ok:
        assert ok["naive_mish"]["saved_bytes"] > ok["torch_mish"]["saved_bytes"] > base


def test_bn_act_rows_compare_against_bn_plus_native(tiny_run):
    _, records = tiny_run
    rows = {r["variant"]: r for r in records if r["record"] == "bn_act"}
    assert set(rows) == {"bn+native", "bn+mishkit", "BatchNormAct2d",
                         "BatchNormAct2d(saves=output)"}
    base = rows["bn+native"]
    assert base["status"] == "ok" and base["speedup_vs_bn_native"] == pytest.approx(1.0)
    for row in rows.values():
        if row["status"] == "ok":
            assert row["speedup_vs_bn_native"] == pytest.approx(
                base["time_ms_median"] / row["time_ms_median"])
            assert row["time_ratio_vs_saves_input"] == pytest.approx(
                row["time_ms_median"] / rows["BatchNormAct2d"]["time_ms_median"])
        else:
            assert row["reason"]


def _kernel_row(mode, **fields):
    return {"record": "kernel", "status": "ok", "activation": "mish", "dtype": "fp32",
            "log2_numel": 22, "mode": mode, "contender": "mishkit-cpu", **fields}


def test_cpu_timing_runs_with_the_process_thread_count():
    # the records report torch.get_num_threads(); torch.utils.benchmark.Timer would otherwise
    # time with one thread
    seen = []
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timing.measure(lambda: seen.append(torch.get_num_threads()), torch.device("cpu"),
                       timing.TimingConfig(cpu_min_run_time_s=0.01, warmup_calls=0))
    finally:
        torch.set_num_threads(previous)
    assert seen and set(seen) == {2}


def test_side_by_side_timing_alternates_the_contenders_in_random_orders():
    calls = []
    # one call per block, none untimed: the call log shows each round's order
    config = timing.TimingConfig(cpu_min_run_time_s=0.0, warmup_calls=1, cpu_rounds=30,
                                 cpu_block_s=1e-9, cpu_block_warmup_calls=0)
    results = timing.measure_side_by_side([lambda k=k: calls.append(k) for k in "abc"],
                                          torch.device("cpu"), config)
    assert "".join(calls[:3]) == "abc"  # warm-up
    rounds = ["".join(calls[i:i + 3]) for i in range(3, len(calls), 3)]
    assert len(rounds) == 30 and all(sorted(r) == list("abc") for r in rounds)
    # what runs before each callable varies: every other callable precedes it in some round
    before = {(r[i - 1], r[i]) for r in rounds for i in (1, 2)}
    assert before == {(p, q) for p in "abc" for q in "abc" if p != q}
    assert all(0 < t.p20 <= t.median <= t.p80 for t in results)
    assert all(len(t.rounds) == config.cpu_rounds and min(t.rounds) > 0 for t in results)
    # the same orders on a rerun
    calls.clear()
    timing.measure_side_by_side([lambda k=k: calls.append(k) for k in "abc"],
                                torch.device("cpu"), config)
    assert ["".join(calls[i:i + 3]) for i in range(3, len(calls), 3)] == rounds


def test_side_by_side_rounds_share_the_time_budget_in_blocks_of_similar_length():
    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    config = timing.TimingConfig(cpu_min_run_time_s=0.06, warmup_calls=1, cpu_rounds=2,
                                 cpu_block_s=0.004, cpu_block_warmup_calls=0)
    started = time.perf_counter()
    fast, slow = timing.measure_side_by_side([sleeper(0.001), sleeper(0.008)],
                                             torch.device("cpu"), config)
    elapsed = time.perf_counter() - started
    # blocks of 4 calls (4 ms) and of one call (8 ms, never fewer than one): rounds of 12 ms
    # share 2 x 0.06 s, about 10 (fewer where sleep oversleeps)
    assert len(fast.rounds) == len(slow.rounds) and 8 <= len(fast.rounds) <= 10
    assert fast.median == pytest.approx(0.001, rel=0.5) and slow.median >= 0.008
    assert elapsed < 0.5


def test_targets_met_not_met_and_not_measured():
    records = [_kernel_row("forward", speedup={"native": 1.25}),
               _kernel_row("forward+backward", speedup={"native": 0.8})]
    by_label = {t["target"]: t for t in report.evaluate_targets(records, "cpu", "mishkit-cpu")}
    assert by_label["CPU Mish forward fp32 2^22 no slower than native"]["status"] == "met"
    assert by_label["CPU Mish fwd+bwd fp32 2^22 no slower than native"]["status"] == "not met"
    missing = report.evaluate_targets(records[:1], "cpu", "mishkit-cpu")[1]
    assert missing["status"].startswith("not measured") and missing["value"] is None
    gpu = report.evaluate_targets([_kernel_row("forward", log2_numel=26, copy_ratio=0.91,
                                               contender="mishkit-cuda")], "cuda", "mishkit-cuda")
    assert gpu[0]["status"] == "met" and gpu[0]["value"] == 0.91
    assert all(t["status"].startswith("not measured") for t in gpu[1:])


def test_paired_ratio_takes_the_ratio_within_each_round():
    # a drift that slows both sides of a round cancels in the per-round ratio
    fast = timing.Timing(1.0, 1.0, 2.0, rounds=(1.0, 2.0, 1.0))
    slow = timing.Timing(3.0, 2.0, 6.0, rounds=(2.0, 4.0, 3.0))
    ratio = timing.paired_ratio(slow, fast)
    assert (ratio.median, ratio.p20, ratio.p80) == pytest.approx((2.0, 2.0, 2.6))
    assert (ratio.ci_low, ratio.ci_high, ratio.rounds) == (2.0, 3.0, 3)  # 3 rounds: all of them
    # timed apart (no rounds): the ratio of the medians
    apart = timing.paired_ratio(timing.Timing(3.0, 2.0, 4.0), timing.Timing(1.5, 1.0, 2.0))
    assert (apart.median, apart.ci_low, apart.ci_high, apart.rounds) == (2.0, 2.0, 2.0, 0)


@pytest.mark.parametrize("n", [25, 50, 100, 200])
def test_median_interval_covers_the_median_95_percent_of_the_time(n):
    # the interval's coverage, computed exactly from the binomial(n, 1/2) distribution of how
    # many samples fall below the true median
    low, high = timing.median_interval_ranks(n)
    coverage = sum(math.comb(n, k) for k in range(low + 1, high + 1)) / 2**n
    assert 0.945 <= coverage <= 0.99
    assert low < n // 2 <= high
    assert timing.median_interval_ranks(5) == (0, 4)  # too few samples: the whole range


def test_a_speedup_target_inside_its_confidence_interval_is_within_noise():
    rows = [_kernel_row("forward", speedup={"native": 0.97},
                        speedup_spread={"native": [0.85, 1.10]},
                        speedup_ci95={"native": [0.95, 1.01]}),
            _kernel_row("forward+backward", speedup={"native": 0.97},
                        speedup_spread={"native": [0.85, 1.10]},
                        speedup_ci95={"native": [0.95, 0.99]})]
    by_label = {t["target"]: t for t in report.evaluate_targets(rows, "cpu", "mishkit-cpu")}
    status = by_label["CPU Mish forward fp32 2^22 no slower than native"]["status"]
    assert status == "within noise (95% CI of the median 0.95–1.01)"
    assert by_label["CPU Mish fwd+bwd fp32 2^22 no slower than native"]["status"] == "not met"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=40), st.sampled_from([0.2, 0.5, 0.8]))
def test_quantile_matches_numpy(values, q):
    values = sorted(values)
    assert timing._quantile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_rotation_fills_the_cache_budget_on_cpu_only():
    config = timing.TimingConfig(cpu_rotation_bytes=1000)
    assert timing.rotation_count(100, torch.device("cpu"), config) == 10
    assert timing.rotation_count(5000, torch.device("cpu"), config) == 1
    huge = timing.TimingConfig(cpu_rotation_bytes=10**9)
    assert timing.rotation_count(1, torch.device("cpu"), huge) == timing.MAX_ROTATION
    assert timing.rotation_count(100, torch.device("cuda"), config) == 1


@pytest.mark.parametrize("name", sorted(contenders.NAIVE_FORMULAS))
def test_naive_formulas_agree_with_the_float64_reference(name):
    x = torch.linspace(-8, 8, 257, dtype=torch.float64)
    spec = get_spec(name)
    torch.testing.assert_close(contenders.naive_formula(spec)(x), spec.reference(x))


def test_parse_sizes_and_bad_cli_input(tmp_path, capsys):
    assert parse_sizes("12:18:2") == [12, 14, 16, 18]
    assert parse_sizes("10,22") == [10, 22]
    with pytest.raises(SystemExit):
        main(["--sizes", "twelve"])
    assert "--sizes expects log2 sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown activation 'mush'"):
        main(["--smoke", "--out", str(tmp_path), "--activations", "mush"])
    with pytest.raises(SystemExit, match="unknown contender"):
        main(["--smoke", "--out", str(tmp_path), "--contenders", "fastest"])
    with pytest.raises(SystemExit, match="unknown suite"):
        main(["--smoke", "--out", str(tmp_path), "--suites", "everything"])
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            main(["--smoke", "--cpu-seconds", bad])
        assert "expected a positive number of seconds" in capsys.readouterr().err
    assert parse_networks("resnet:2:512, stack:4:64") == [
        ("resnet50dilated+ppm_deepsup", 2, 512), ("conv-bn-act stack", 4, 64)]
    for bad in ("resnet:2", "vgg:2:64", "stack:0:64", "stack:two:64"):
        with pytest.raises(SystemExit):
            main(["--compile-networks", bad])
        assert "--compile-networks expects NAME:BATCH:SIZE" in capsys.readouterr().err


_ROUNDS_PAGE_FAULTS = """
import resource, sys, torch
from benchmarks import timing
print(timing.keep_freed_memory_for_reuse(), file=sys.stderr)
x = torch.randn(1 << 22)
def naive():  # a 16 MiB temporary and a 16 MiB output
    return x * torch.sigmoid(x)
def fused():  # one output
    return torch.sigmoid(x)
def one_round():  # two contenders side by side, two calls each
    for contender in (naive, fused):
        for _ in range(2):
            contender()
for _ in range(3):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc and getrusage page faults")
def test_fixed_malloc_thresholds_keep_alternating_contenders_off_fresh_pages():
    # in a fresh interpreter, as the benchmark process sets them at its start. With glibc's
    # adaptive thresholds this script faulted 81600 pages (every output fresh) in 2 of 5 runs.
    done = subprocess.run([sys.executable, "-c", _ROUNDS_PAGE_FAULTS], capture_output=True,
                          text=True, check=True, cwd=REPO_ROOT)
    assert done.stderr.startswith("glibc malloc")
    assert int(done.stdout.split()[-1]) < 400  # one fresh 16 MiB output faults 4096 pages


def test_cases_run_the_first_patterns_first():
    grid = KernelGrid(["relu", "mish"], ["fp32", "bf16"], [12, 22], ["forward"],
                      first=(("mish", 22), ("*", 22)))
    cases = grid.cases()
    assert cases[:4] == [("mish", "fp32", 22), ("mish", "bf16", 22),
                         ("relu", "fp32", 22), ("relu", "bf16", 22)]
    assert sorted(cases) == sorted((a, d, s) for a in ("relu", "mish")
                                   for d in ("fp32", "bf16") for s in (12, 22))


@pytest.mark.gpu
def test_gpu_rows_have_timings_and_peak_memory():
    grid = KernelGrid(["mish"], ["fp32"], [16], list(ELEMENTS),
                      contenders=["mishkit-cuda", "mishkit-triton", "native", "naive"])
    config = timing.TimingConfig(gpu_warmup_ms=1, gpu_rep_ms=3)
    rows = [r for r in run_kernel_grid(grid, torch.device("cuda"), config, log=lambda _: None)
            if r["record"] == "kernel"]
    native = [r for r in rows if r["contender"] == "native"]
    assert all(r["status"] == "ok" for r in native)
    for row in rows:
        if row["status"] == "ok" and row["mode"] == "forward+backward":
            assert row["peak_memory_bytes"] >= 2**16 * 4  # at least the gradient it returns


def test_a_failing_suite_is_recorded_and_the_run_still_finishes(tmp_path, monkeypatch):
    def broken():
        raise ImportError("no network variants in this build")

    monkeypatch.setattr(layers, "network_variants", broken)
    assert main(["--smoke", "--out", str(tmp_path), "--suites", "memory,bn_act"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    errors = [r for r in records if r["record"] == "suite_error"]
    assert errors == [{"record": "suite_error", "suite": "memory",
                       "reason": "ImportError: no network variants in this build"}]
    assert any(r["record"] == "bn_act" for r in records)  # the next suite still ran
    assert "Suite `memory` stopped early" in (tmp_path / "summary.md").read_text()


def test_the_former_mishkit_bench_command_points_to_the_harness(capsys):
    assert mishkit_main(["bench", "--smoke"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def test_compile_suite_rows_ratios_and_targets(tmp_path):
    # Dynamo alone ("eager") keeps this fast; the arithmetic is the same for any backend
    assert main(["--smoke", "--out", str(tmp_path), "--suites", "compile",
                 "--compile-backend", "eager"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    rows = {r["variant"]: r for r in records if r["record"] == "compile_network"}
    assert list(rows) == list(layers.COMPILE_VARIANTS)
    assert all(r["status"] == "ok" and r["network"] == "conv-bn-act stack" for r in rows.values())
    assert rows["compile mishkit"]["compile_backend"] == "eager"
    assert rows["eager mishkit"]["compile_backend"] is None
    base, eager = rows["compile native"], rows["eager mishkit"]
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["time_ms_median"] / 1e3))
        assert row["time_ratio_vs_compile_native"] == pytest.approx(
            row["time_ms_median"] / base["time_ms_median"])
        assert row["saved_ratio_vs_compile_native"] == pytest.approx(
            row["saved_bytes"] / base["saved_bytes"])
        assert row["time_ratio_vs_eager_mishkit"] == pytest.approx(
            row["time_ms_median"] / eager["time_ms_median"])
    fused = rows["eager mishkit fuse_bn"]
    for row in rows.values():
        assert row["time_ratio_vs_eager_fuse_bn"] == pytest.approx(
            row["time_ms_median"] / fused["time_ms_median"])
    # eager mishkit Mish saves only each activation's input: no more than nn.Mish; fused BN
    # saving only its output saves less than fused BN saving its input
    assert rows["eager mishkit"]["saved_bytes"] <= rows["eager native"]["saved_bytes"]
    assert (rows["eager mishkit fuse_bn output"]["saved_bytes"]
            < rows["eager mishkit fuse_bn"]["saved_bytes"])
    targets = {r["target"]: r for r in records if r["record"] == "target"}
    label = "conv-bn-act stack: eager mishkit fuse_bn time ≤ eager mishkit"
    ratio = rows["eager mishkit fuse_bn"]["time_ratio_vs_eager_mishkit"]
    assert targets[label]["value"] == pytest.approx(ratio)
    assert targets[label]["status"] == ("met" if ratio <= 1.0 else "not met")
    label = "conv-bn-act stack: eager fuse_bn='output' fwd+bwd time ≤ 1.15× fuse_bn=True"
    ratio = rows["eager mishkit fuse_bn output"]["time_ratio_vs_eager_fuse_bn"]
    assert targets[label]["value"] == pytest.approx(ratio)
    assert targets[label]["status"] == ("met" if ratio <= 1.15 else "not met")
    summary = (tmp_path / "summary.md").read_text()
    assert "## torch.compile (eager) vs eager" in summary and "compile mishkit fuse_bn" in summary
