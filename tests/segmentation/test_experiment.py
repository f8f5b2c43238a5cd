"""The experiment: same data per seed across arms, report statistics recomputed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segmentation.config import load_config
from segmentation.engine.distributed import DistContext
from segmentation.engine.report import summarize
from segmentation.engine.trainer import Trainer
from segmentation.experiment import run_config, run_experiment

ARMS = [{"name": "relu", "activation": "relu", "scope": "all", "fuse_bn": False},
        {"name": "mish-dec", "activation": "mish", "scope": "decoder", "fuse_bn": False}]


def tiny_experiment_cfg(root, *extra):
    return load_config(None, [
        "DATASET.root_dataset", "", "DATASET.list_train", str(root / "training.odgt"),
        "DATASET.list_val", str(root / "validation.odgt"), "DATASET.imgSizes", "[32]",
        "DATASET.imgMaxSize", "64", "MODEL.arch_encoder", "mobilenetv2dilated",
        "MODEL.arch_decoder", "c1_deepsup", "TRAIN.workers", "0", "TRAIN.num_threads", "1",
        "TRAIN.progress", "false", "TRAIN.batch_size_per_gpu", "2", "TRAIN.num_epoch", "2",
        "TRAIN.epoch_iters", "2", "TRAIN.disp_iter", "1", "TRAIN.eval_every", "1",
        "VAL.single_size", "32", "VAL.imgMaxSize", "64", "VAL.workers", "0",
        "VAL.absent", "ignore", "EXPERIMENT.seeds", "[0, 1]",
        "EXPERIMENT.arms", json.dumps(ARMS), *extra])


def test_arms_share_data_order_and_initial_weights_per_seed(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root)
    trainers = {}
    for arm in ARMS:
        for seed in (0, 1):
            run = run_config(cfg, arm, seed, tmp_path)
            assert run.MODEL.activation == arm["activation"] and run.TRAIN.seed == seed
            trainers[arm["name"], seed] = Trainer(run, DistContext())

    def batches(trainer):
        trainer.sampler.set_epoch(0)
        return [[tuple(spec) for spec in batch] for batch in trainer.sampler]

    for seed in (0, 1):
        relu, mish = trainers["relu", seed], trainers["mish-dec", seed]
        assert batches(relu) == batches(mish)
        relu_state, mish_state = relu.model.state_dict(), mish.model.state_dict()
        assert all((relu_state[k] == mish_state[k]).all() for k in relu_state)
    assert batches(trainers["relu", 0]) != batches(trainers["relu", 1])  # seeds differ


def test_experiment_writes_consistent_report(tmp_path, synthetic_root):
    out = tmp_path / "exp"
    report = run_experiment(tiny_experiment_cfg(synthetic_root), out, DistContext())
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in saved["runs"]}
    assert set(runs) == {(a["name"], s) for a in ARMS for s in (0, 1)}
    for run in runs.values():
        assert run["iterations"] == 4 and 0.0 <= run["miou"] <= 1.0
        assert [p[0] for p in run["miou_curve"]] == [2, 4]  # validation after each epoch
        assert len(run["loss_curve"]) == 4
    mish = saved["arms"]["mish-dec"]
    values = [runs["mish-dec", s]["miou"] for s in (0, 1)]
    assert mish["stats"]["miou"]["mean"] == pytest.approx(np.mean(values))
    assert mish["stats"]["miou"]["std"] == pytest.approx(np.std(values, ddof=1))
    diffs = [runs["mish-dec", s]["miou"] - runs["relu", s]["miou"] for s in (0, 1)]
    vs = mish["vs_baseline"]["miou"]
    half = 12.7062047 * np.std(diffs, ddof=1) / math.sqrt(2)  # t(0.975, df=1)
    assert vs["mean"] == pytest.approx(np.mean(diffs))
    assert vs["ci_high"] == pytest.approx(np.mean(diffs) + half, abs=1e-9)
    assert "vs_baseline" not in saved["arms"]["relu"]
    text = (out / "report.md").read_text()
    assert "mish-dec" in text and "95% CI" in text
    assert report["meta"]["wall_time_s"] > 0

    # A repeated command reuses the finished runs (same config) instead of training again.
    mtime = (out / "runs" / "relu" / "seed_0" / "result.json").stat().st_mtime
    run_experiment(tiny_experiment_cfg(synthetic_root), out, DistContext())
    assert (out / "runs" / "relu" / "seed_0" / "result.json").stat().st_mtime == mtime


def test_summarize_by_hand():
    runs = [{"arm": a, "seed": s, "miou": m, "pixel_acc": p, "images_per_s": i}
            for a, s, m, p, i in [("relu", 0, 0.30, 0.70, 10.0), ("relu", 1, 0.40, 0.80, 12.0),
                                  ("mish", 0, 0.35, 0.72, 8.0), ("mish", 1, 0.41, 0.79, 9.0)]]
    arms = [{"name": "relu", "activation": "relu"}, {"name": "mish", "activation": "mish"}]
    summary = summarize(runs, arms, "relu")
    assert summary["arms"]["relu"]["stats"]["miou"]["mean"] == pytest.approx(0.35)
    assert summary["arms"]["relu"]["stats"]["miou"]["std"] == pytest.approx(math.sqrt(0.005))
    diff = summary["arms"]["mish"]["vs_baseline"]["images_per_s"]
    # differences -2, -3: mean -2.5, sd sqrt(0.5), half-width 12.7062 * sqrt(0.5) / sqrt(2)
    assert diff["mean"] == pytest.approx(-2.5)
    assert diff["ci_low"] == pytest.approx(-2.5 - 12.7062047 * 0.5, rel=1e-6)


def test_unknown_baseline_is_rejected(tmp_path, synthetic_root):
    from segmentation.config import ConfigError

    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.baseline", "gelu")
    with pytest.raises(ConfigError, match="baseline 'gelu' is not an arm"):
        run_experiment(cfg, tmp_path / "exp", DistContext())
