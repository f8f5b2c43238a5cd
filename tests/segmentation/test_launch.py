"""The submitit launcher on CPU through submitit's local executor: a preempted job is requeued
and resumes from its checkpoint to the uninterrupted result; a two-task job is a DDP run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from segmentation.engine.launch import SubmititLauncher, slurm_parameters
from segmentation.engine.runs import RunSpec, run_state, train_run
from segmentation.experiment import gather

from .test_experiment import tiny_experiment_cfg

pytestmark = pytest.mark.distributed


def _wait_for(path, timeout_s=300.0):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


def test_preempted_job_is_requeued_and_resumes_to_the_same_result(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]", "TRAIN.num_epoch", "8",
                              "EXPERIMENT.slurm.gpus_per_node", "0",
                              "EXPERIMENT.slurm.time_min", "20")
    spec = RunSpec("mish-dec", 0)
    out = tmp_path / "exp"
    launcher = SubmititLauncher(cfg, out, cluster="local")
    [job] = launcher.submit([spec])
    assert launcher.active() == {"runs/mish-dec/seed_0": (job.job_id, "RUNNING")}

    folder = spec.folder(out)
    _wait_for(folder / "checkpoints" / "epoch_1.pth")
    pid = json.loads((folder / "attempt.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)  # what slurm sends before preempting or timing out a job
    assert launcher.wait([spec], [job]) == []
    record = json.loads((folder / "result.json").read_text())
    assert record["resumed_from"] >= 2  # went on from a checkpoint, not from scratch
    assert "Requeued" in job.stdout() + (job.stderr() or "")
    assert launcher.active() == {}

    reference = train_run(cfg.to_dict(), spec.to_dict(), str(tmp_path / "whole"))
    assert record["miou"] == reference["miou"]
    assert record["loss_curve"] == reference["loss_curve"]

    # The report gathers what finished and names what did not.
    report = gather(cfg, out, "tiny", jobs=launcher.states())
    assert report["meta"]["finished_runs"] == 1
    assert [m["run"] for m in report["missing"]] == ["relu seed 0"]
    assert report["missing"][0]["state"] == "not started"


def test_two_task_job_trains_one_ddp_run(tmp_path, synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.seeds", "[0]",
                              "EXPERIMENT.slurm.gpus_per_node", "0",
                              "EXPERIMENT.slurm.tasks_per_node", "2")
    spec = RunSpec("relu", 0)
    launcher = SubmititLauncher(cfg, tmp_path, cluster="local")
    jobs = launcher.submit([spec])
    assert launcher.wait([spec], jobs) == []
    record = json.loads((spec.folder(tmp_path) / "result.json").read_text())
    assert record["machine"]["world_size"] == 2
    # Two ranks of batch 2 each: 12 training images give 3 iterations per pass; 2 epochs of 2.
    assert record["iterations"] == 4
    assert run_state(cfg, spec, tmp_path).status == "finished"


def test_slurm_parameters_follow_the_experiment_section(synthetic_root):
    cfg = tiny_experiment_cfg(synthetic_root, "EXPERIMENT.slurm.partition", "gpu",
                              "EXPERIMENT.slurm.gpus_per_node", "8",
                              "EXPERIMENT.slurm.mem_gb", "400",
                              "EXPERIMENT.slurm.setup", "['module load cuda']",
                              "EXPERIMENT.slurm.extra", "['qos=high', 'mail-type=END']")
    params = slurm_parameters(cfg)
    assert params["ntasks_per_node"] == params["gpus_per_node"] == 8
    assert params["partition"] == "gpu" and params["mem"] == "400GB"
    assert params["additional_parameters"] == {"qos": "high", "mail-type": "END"}
    assert params["setup"] == ["module load cuda"] and params["exclusive"] is True
    assert "account" not in params  # empty settings are left to the cluster's defaults
