"""The report's statistics against independent references: Monte-Carlo power, textbook sample
sizes, closed-form chi-square quantiles, Holm by hand, and the analysis of hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation.engine import stats
from segmentation.engine.analysis import analyse, select_learning_rates, side_by_side


def _monte_carlo_power(delta, sd, n, alpha, trials=200_000, seed=0):
    from scipy.stats import t as student

    rng = np.random.default_rng(seed)
    diffs = rng.normal(delta, sd, size=(trials, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    return float((np.abs(t) > student.ppf(1 - alpha / 2, n - 1)).mean())


@pytest.mark.parametrize(("delta", "n", "alpha"), [(1.0, 10, 0.05), (2.0, 3, 0.05),
                                                    (1.5, 5, 0.05 / 3)])
def test_paired_power_matches_simulation(delta, n, alpha):
    expected = _monte_carlo_power(delta, 1.0, n, alpha)
    assert stats.paired_power(delta, 1.0, n, alpha) == pytest.approx(expected, abs=0.005)


def test_textbook_sample_sizes_and_detectable_difference():
    # Paired t-test, two-sided α = 0.05, 80% power: d = 0.5 needs 34 pairs, d = 1 needs 10
    # (power 0.803 at n = 10), the classic table values.
    assert stats.seeds_needed(0.5, 1.0) == 34
    assert stats.seeds_needed(1.0, 1.0) == 10
    assert stats.paired_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-4)
    for n in (3, 5, 10):
        smallest = stats.detectable_difference(2.0, n)
        assert stats.paired_power(smallest, 2.0, n) == pytest.approx(0.8, abs=1e-9)
        assert stats.seeds_needed(smallest * 1.0001, 2.0) == n
    # Stricter level (Holm's first step), bigger detectable difference; scales with sd.
    assert stats.detectable_difference(1.0, 3, alpha=0.05 / 3) > stats.detectable_difference(1, 3)
    three = stats.detectable_difference(3.0, 4)
    assert three == pytest.approx(3 * stats.detectable_difference(1.0, 4))
    assert math.isnan(stats.detectable_difference(1.0, 1))
    assert stats.seeds_needed(1.0, math.nan) is None


def test_std_interval_matches_closed_form_chi_square():
    # df = 2: chi-square quantile q(p) = -2 ln(1 - p).
    low, high = stats.std_interval(1.0, 3)
    assert low == pytest.approx(math.sqrt(2 / (-2 * math.log(0.025))))
    assert high == pytest.approx(math.sqrt(2 / (-2 * math.log(0.975))))
    assert all(math.isnan(v) for v in stats.std_interval(1.0, 1))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    adjusted = stats.holm([0.02, math.nan, 0.4])  # untested comparisons leave the family
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2·0.8 capped at 1, monotone


def test_paired_difference_p_value_and_interval():
    diffs = [0.5, 1.5, 1.0, 2.0]
    result = stats.paired_difference([d + 3 for d in diffs], [3.0] * 4)
    mean, sd = np.mean(diffs), np.std(diffs, ddof=1)
    t = mean / (sd / 2)
    from scipy.stats import ttest_rel

    expected = ttest_rel([d + 3 for d in diffs], [3.0] * 4)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["ci_high"] - mean == pytest.approx(3.182446305 * sd / 2)  # t(0.975, 3)
    assert t > 0


def test_bootstrap_interval_agrees_with_the_normal_interval_for_a_large_sample():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, 4000)
    low, high = stats.bootstrap_mean_interval(values, resamples=2000)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)
    assert stats.bootstrap_mean_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)


def _record(arm, seed, miou, *, lr=None, ips=10.0, host="a", span=None):
    record = {"arm": arm, "seed": seed, "lr_scale": lr, "miou": miou, "pixel_acc": miou + 0.5,
              "images_per_s": ips}
    if span is not None:
        record["machine"] = {"host": host, "started_at": span[0], "finished_at": span[1]}
    return record


def test_side_by_side_counts_the_most_concurrent_runs():
    records = [_record("a", 0, 0.1, span=(0, 10)), _record("b", 0, 0.1, span=(5, 15)),
               _record("c", 0, 0.1, span=(12, 20)), _record("d", 0, 0.1, span=(30, 40)),
               _record("e", 0, 0.1, span=(0, 40), host="other"), _record("f", 0, 0.1)]
    # b overlaps a and then c, but never both at once: at most 2 side by side.
    assert side_by_side(records) == [2, 2, 2, 1, 1, None]


def test_lr_selection_takes_the_best_mean_per_arm():
    records = [_record("relu", s, m, lr=lr) for s, lr, m in
               [(0, 0.5, 0.30), (1, 0.5, 0.34), (0, 1.0, 0.33), (1, 1.0, 0.35)]]
    records += [_record("mish", s, m, lr=lr) for s, lr, m in
                [(0, 0.5, 0.40), (1, 0.5, 0.38), (0, 1.0, 0.36), (1, 1.0, 0.37)]]
    selection = select_learning_rates(records, ["relu", "mish"])
    assert selection["relu"]["chosen"] == 1.0 and selection["mish"]["chosen"] == 0.5
    assert selection["mish"]["grid"][0] == {"lr_scale": 0.5, "mean": pytest.approx(0.39),
                                            "std": pytest.approx(math.sqrt(0.0002)), "n": 2}


def test_analysis_by_hand_holm_family_excludes_the_aa_arm():
    arms = [{"name": n, "activation": a} for n, a in
            [("relu", "relu"), ("mish", "mish"), ("gelu", "gelu"), ("relu-aa", "relu")]]
    mious = {"relu": [0.30, 0.40, 0.35], "mish": [0.33, 0.44, 0.37],
             "gelu": [0.31, 0.39, 0.38], "relu-aa": [0.32, 0.38, 0.36]}
    cells = [(arm, seed, value) for arm, values in mious.items()
             for seed, value in enumerate(values)]
    records = [_record(arm, seed, value, span=(10 * i, 10 * i + 9))  # one run at a time
               for i, (arm, seed, value) in enumerate(cells)]
    summary = analyse(records, arms, "relu", deltas=[0.02],
                      same_function=[{"arms": ["relu", "relu-aa"],
                                      "max_relative_difference": 0.0}])
    assert summary["family"] == ["mish", "gelu"]
    mish, gelu = (summary["arms"][n]["vs_baseline"]["miou"] for n in ("mish", "gelu"))
    p = sorted([mish["p_value"], gelu["p_value"]])
    first = min(1, 2 * p[0])
    holm = {mish["p_value"]: first, gelu["p_value"]: max(first, p[1])}
    assert mish["p_holm"] == pytest.approx(holm[mish["p_value"]])
    assert gelu["p_holm"] == pytest.approx(holm[gelu["p_value"]])
    aa = summary["arms"]["relu-aa"]
    assert aa["aa"] and "p_holm" not in aa["vs_baseline"]["miou"]
    [pair] = summary["aa_pairs"]
    assert pair["arms"] == ["relu", "relu-aa"]
    assert pair["mean"] == pytest.approx(np.mean([0.02, -0.02, 0.01]))

    # The pooled paired sd: the three arms' differences to relu, each with 2 df (the A/A pair
    # is one of them, not counted twice).
    sds = [np.std(np.subtract(mious[n], mious["relu"]), ddof=1) for n in ("mish", "gelu",
                                                                            "relu-aa")]
    noise = summary["noise"]
    assert noise["pooled"]["sd"] == pytest.approx(math.sqrt(np.mean(np.square(sds))))
    assert noise["pooled"]["df"] == 6 and noise["tests"] == 2
    assert noise["aa"]["sd"] == pytest.approx(sds[2])
    assert noise["pooled"]["detectable"]["single"] == pytest.approx(
        stats.detectable_difference(noise["pooled"]["sd"], 3))
    assert noise["pooled"]["detectable"]["holm_first"] == pytest.approx(
        stats.detectable_difference(noise["pooled"]["sd"], 3, alpha=0.025))
    [row] = noise["pooled"]["seeds_needed"]
    assert row["single"] == stats.seeds_needed(0.02, noise["pooled"]["sd"])
    per_arm_std = summary["arms"]["mish"]["stats"]["miou"]["std"]
    assert per_arm_std == pytest.approx(np.std(mious["mish"], ddof=1))
    # Every run ran alone (spans do not overlap): throughput comes from all of them.
    assert summary["arms"]["mish"]["throughput"] == {"mean": 10.0, "std": 0.0, "n": 3,
                                                     "alone": True, "timed": True,
                                                     "max_side_by_side": 0}


def test_throughput_prefers_runs_that_had_the_machine_alone():
    arms = [{"name": "relu", "activation": "relu"}, {"name": "mish", "activation": "mish"}]
    records = [_record("relu", 0, 0.3, ips=20.0, span=(0, 9)),
               _record("mish", 0, 0.3, ips=10.0, span=(0, 9)),  # these two shared the host
               _record("relu", 1, 0.3, ips=40.0, span=(10, 19)),
               _record("mish", 1, 0.3, ips=36.0, span=(20, 29))]
    summary = analyse(records, arms, "relu")
    relu, mish = summary["arms"]["relu"], summary["arms"]["mish"]
    assert relu["throughput"]["mean"] == 40.0 and relu["throughput"]["alone"]
    assert mish["throughput"]["mean"] == 36.0
    diff = mish["vs_baseline"]["images_per_s"]
    assert diff["mean"] == -4.0 and diff["n"] == 1 and diff["alone"]  # only seed 1 was fair
