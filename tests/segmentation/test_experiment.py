"""The experiment end to end on CPU: same data per seed across arms, A/A arms, exact resume,
reuse, conflicts, the report's statistics recomputed by hand, and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segmentation.config import ConfigError, load_config
from segmentation.engine.distributed import DistContext
from segmentation.engine.logging import read_metrics
from segmentation.engine.runs import (
    RunConflictError,
    RunSpec,
    run_config,
    run_state,
    train_run,
    write_initial_weights,
)
from segmentation.engine.trainer import Trainer
from segmentation.experiment import main, run_experiment

ARMS = [{"name": "relu", "activation": "relu", "scope": "all", "fuse_bn": False},
        {"name": "mish-dec", "activation": "mish", "scope": "decoder", "fuse_bn": False}]
REORDER = {"name": "relu-reorder", "activation": "relu", "data_seed": 1000}


def tiny_experiment_cfg(root, *extra, arms=ARMS):
    return load_config(None, [
        "DATASET.root_dataset", "", "DATASET.list_train", str(root / "training.odgt"),
        "DATASET.list_val", str(root / "validation.odgt"), "DATASET.imgSizes", "[32]",
        "DATASET.imgMaxSize", "64", "MODEL.arch_encoder", "mobilenetv2dilated",
        "MODEL.arch_decoder", "c1_deepsup", "TRAIN.workers", "0", "TRAIN.num_threads", "1",
        "TRAIN.progress", "false", "TRAIN.batch_size_per_gpu", "2", "TRAIN.num_epoch", "2",
        "TRAIN.epoch_iters", "2", "TRAIN.disp_iter", "1", "TRAIN.eval_every", "1",
        "VAL.single_size", "32", "VAL.imgMaxSize", "64", "VAL.workers", "0",
        "VAL.absent", "ignore", "EXPERIMENT.seeds", "[0, 1]",
        "EXPERIMENT.arms", json.dumps(arms), *extra])


def _batches(trainer):
    trainer.sampler.set_epoch(0)
    return [[tuple(spec) for spec in batch] for batch in trainer.sampler]


def _same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch_equal(sa[k], sb[k]) for k in sa)


def torch_equal(x, y):
    return x.shape == y.shape and bool((x == y).all())


def test_arms_share_data_order_and_initial_weights_per_seed(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root)
    trainers = {}
    for arm in ARMS:
        for seed in (0, 1):
            run = run_config(cfg, RunSpec(arm["name"], seed), tmp_path)
            assert run.MODEL.activation == arm["activation"] and run.TRAIN.seed == seed
            trainers[arm["name"], seed] = Trainer(run, DistContext())
    for seed in (0, 1):
        relu, mish = trainers["relu", seed], trainers["mish-dec", seed]
        assert _batches(relu) == _batches(mish)
        assert _same_weights(relu, mish)
    assert _batches(trainers["relu", 0]) != _batches(trainers["relu", 1])  # seeds differ


def test_data_seed_arm_starts_from_the_seeds_weights_with_another_data_order(
        tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, arms=[*ARMS, REORDER])
    for seed in (0, 1):
        spec = RunSpec("relu-reorder", seed)
        run = run_config(cfg, spec, tmp_path)
        assert run.TRAIN.seed == seed + 1000
        write_initial_weights(cfg, spec, tmp_path, DistContext())
        reorder = Trainer(run, DistContext())
        relu = Trainer(run_config(cfg, RunSpec("relu", seed), tmp_path), DistContext())
        assert _same_weights(reorder, relu)
        assert _batches(reorder) != _batches(relu)


def test_experiment_writes_consistent_report(tmp_path, synthetic_root):
    out = tmp_path / "exp"
    report = run_experiment(tiny_experiment_cfg(synthetic_root), out)
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in saved["runs"]}
    assert set(runs) == {(a["name"], s) for a in ARMS for s in (0, 1)}
    assert saved["missing"] == [] and saved["meta"]["finished_runs"] == 4
    for run in runs.values():
        assert run["iterations"] == 4 and 0.0 <= run["miou"] <= 1.0
        assert [p[0] for p in run["miou_curve"]] == [2, 4]  # validation after each epoch
        assert len(run["loss_curve"]) == 4
        assert run["machine"]["threads"] == 1 and run["side_by_side"] == 1  # one at a time
    mish = saved["arms"]["mish-dec"]
    values = [runs["mish-dec", s]["miou"] for s in (0, 1)]
    assert mish["stats"]["miou"]["mean"] == pytest.approx(np.mean(values))
    assert mish["stats"]["miou"]["std"] == pytest.approx(np.std(values, ddof=1))
    diffs = np.array([runs["mish-dec", s]["miou"] - runs["relu", s]["miou"] for s in (0, 1)])
    vs = mish["vs_baseline"]["miou"]
    sd = np.std(diffs, ddof=1)
    assert vs["mean"] == pytest.approx(diffs.mean())
    assert vs["ci_high"] == pytest.approx(diffs.mean() + 12.7062047 * sd / math.sqrt(2),
                                          abs=1e-9)  # t(0.975, df=1)
    if sd > 0:  # df = 1: Student t is Cauchy, P(|T| > t) = 1 - 2 atan(t) / pi
        t = abs(diffs.mean()) / (sd / math.sqrt(2))
        assert vs["p_value"] == pytest.approx(1 - 2 * math.atan(t) / math.pi)
        assert vs["p_holm"] == pytest.approx(vs["p_value"])  # a family of one
    assert "vs_baseline" not in saved["arms"]["relu"]
    assert saved["same_function"] == []  # relu vs mish in the decoder
    assert saved["per_image"]["missing"] == []  # every run's final validation wrote them
    assert set(saved["per_image"]["comparisons"]) == {"mish-dec"}
    text = (out / "report.md").read_text()
    for phrase in ("mish-dec", "95% CI", "Noise floor and power", "80% power", "Holm",
                   "test-set noise", "no per-arm search"):
        assert phrase in text
    assert report["meta"]["wall_time_s"] > 0

    # A repeated command reuses the finished runs instead of training again, also with a
    # changed result-neutral setting and a seed added (only that seed's runs train).
    mtime = (out / "runs" / "relu" / "seed_0" / "result.json").stat().st_mtime
    cfg = tiny_experiment_cfg(synthetic_root, "TRAIN.progress", "true",
                              "EXPERIMENT.seeds", "[0, 1, 2]")
    assert [run_state(cfg, RunSpec("relu", s), out).status for s in (0, 1, 2)] == \
        ["finished", "finished", "new"]
    assert (out / "runs" / "relu" / "seed_0" / "result.json").stat().st_mtime == mtime


def test_a_run_of_another_config_in_the_folder_is_an_error(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]")
    spec = RunSpec("relu", 0)
    train_run(cfg.to_dict(), spec.to_dict(), str(tmp_path))
    other = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]",
                                "TRAIN.lr_encoder", "0.5")
    with pytest.raises(RunConflictError, match=r"differs in TRAIN.lr_encoder.*another --out"):
        run_state(other, spec, tmp_path)


def test_interrupted_run_resumes_exactly(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]", "TRAIN.num_epoch", "3")
    spec = RunSpec("mish-dec", 0)
    reference = train_run(cfg.to_dict(), spec.to_dict(), str(tmp_path / "whole"))

    out = tmp_path / "interrupted"
    trainer = Trainer(run_config(cfg, spec, out), DistContext())
    trainer.train(stop_at=4)  # checkpoints at iteration 4 (end of epoch 2), then "dies"
    trainer.metrics.write("train", 5, loss=9.0)  # logged after the checkpoint: to be dropped
    trainer.close()
    log = out / "runs" / "mish-dec" / "seed_0" / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('{"kind": "train", "st')  # the kill cut the last line off
    assert run_state(cfg, spec, out).status == "partial"
    resumed = train_run(cfg.to_dict(), spec.to_dict(), str(out))
    assert resumed["resumed_from"] == 4
    assert resumed["miou"] == reference["miou"] and resumed["loss_curve"] == reference["loss_curve"]
    steps = [r["step"] for r in read_metrics(out / "runs" / "mish-dec" / "seed_0" / "metrics.jsonl",
                                             "train")]
    assert steps == sorted(set(steps)) == list(range(1, 7))


def test_failed_run_is_reported_and_the_others_go_on(tmp_path, synthetic_root, monkeypatch):
    train = Trainer.train

    def failing_for_mish(self, *args, **kwargs):
        if self.cfg.MODEL.activation == "mish":
            raise RuntimeError("out of memory (simulated)")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", failing_for_mish)
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0, 1]")
    report = run_experiment(cfg, tmp_path)
    assert report["meta"]["finished_runs"] == 2
    assert [m["run"] for m in report["missing"]] == ["mish-dec seed 0", "mish-dec seed 1"]
    assert {m["state"] for m in report["missing"]} == {"failed"}
    assert "out of memory (simulated)" in report["missing"][0]["detail"]
    assert "error.txt" in report["missing"][0]["detail"]
    assert "| mish-dec seed 0 | failed |" in (tmp_path / "report.md").read_text()

    monkeypatch.setattr(Trainer, "train", train)  # fixed: the next command trains only those
    report = run_experiment(cfg, tmp_path)
    assert report["missing"] == [] and report["meta"]["finished_runs"] == 4
    assert not (tmp_path / "runs" / "mish-dec" / "seed_0" / "error.txt").exists()


def test_config_rejects_bad_experiment_sections(synthetic_root):
    with pytest.raises(ConfigError, match="baseline 'gelu' is not an arm"):
        tiny_experiment_cfg(synthetic_root, "EXPERIMENT.baseline", "gelu")
    with pytest.raises(ConfigError, match=r"arms\[0\].*unknown \['lr'\]"):
        tiny_experiment_cfg(synthetic_root, arms=[{"name": "a", "activation": "relu", "lr": 1}])
    with pytest.raises(ConfigError, match="lr_grid holds positive"):
        tiny_experiment_cfg(synthetic_root, "EXPERIMENT.lr_grid", "[0.5, -1]")
    with pytest.raises(ConfigError, match="repeated seeds"):
        tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[1, 1]")
    with pytest.raises(ConfigError, match=r"arms\[0\] \(a\): unknown activation 'mush'"):
        tiny_experiment_cfg(synthetic_root, arms=[{"name": "a", "activation": "mush"}])
    with pytest.raises(ConfigError, match=r"slurm\.extra entries"):
        tiny_experiment_cfg(synthetic_root, "EXPERIMENT.slurm.extra", "['--qos high']")


def _write_cfg(tmp_path, cfg):
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.dump())
    return str(path)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, synthetic_root, capsys):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.lr_grid", "[0.5, 1]")
    path, out = _write_cfg(tmp_path, cfg), tmp_path / "exp"
    assert main(["--cfg", path, "--out", str(out), "--dry-run", "--jobs", "2"]) == 0
    text = capsys.readouterr().out
    assert "8 runs planned; 0 finished (reused), 0 queued or running (left alone), 8 to train" \
        in text
    assert "mish-dec lr×0.5 seed 1" in text and "train from scratch" in text
    assert "local: 2 run(s) at a time" in text
    assert not out.exists()

    argv = ["--cfg", path, "--out", str(out), "--launcher", "slurm", "--dry-run",
            "--partition", "gpu", "--account", "vision", "--nodes", "2", "--gpus-per-node", "4",
            "--time-min", "600", "EXPERIMENT.slurm.extra", "['mail-type=END']"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "8 job(s) as one submitit array; each job 2 node(s) × 4 task(s) = 8 DDP rank(s)" \
        in text
    assert "global 16" in text
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --time=600", "#SBATCH --exclusive", "#SBATCH --mail-type=END"):
        assert line in text
    assert not out.exists()


def test_report_only_lists_missing_runs(tmp_path, synthetic_root, capsys):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]")
    out = tmp_path / "exp"
    train_run(cfg.to_dict(), RunSpec("relu", 0).to_dict(), str(out))
    assert main(["--cfg", _write_cfg(tmp_path, cfg), "--out", str(out), "--report-only"]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 runs finished" in text
    assert "| mish-dec seed 0 | not started |" in text


def test_runs_recorded_before_the_launchers_are_reused(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]")
    out = tmp_path / "exp"
    for arm in ARMS:  # rewrite the records the way the single-machine experiment wrote them
        spec = RunSpec(arm["name"], 0)
        record = train_run(cfg.to_dict(), spec.to_dict(), str(out))
        for key in ("lr_scale", "lr_encoder", "lr_decoder", "machine", "resumed_from"):
            del record[key]
        record["config"]["TRAIN"]["resume"] = ""
        (spec.folder(out) / "result.json").write_text(json.dumps(record))
    report = run_experiment(cfg, out)
    assert report["missing"] == [] and report["meta"]["finished_runs"] == 2
    assert report["arms"]["mish-dec"]["throughput"]["timed"] is False
    assert "unknown (no start/end times recorded)" in (out / "report.md").read_text()
