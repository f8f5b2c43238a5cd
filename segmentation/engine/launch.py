"""Launchers for the experiment's runs: local processes, or one submitit job per run.

``local``: the runs train in this process, or ``EXPERIMENT.jobs`` at a time in spawned worker
processes. ``slurm``: every run is one job of a submitit job array; a job is one process per
task (one per GPU, ``EXPERIMENT.slurm``), and submitit's ``TorchDistributedEnvironment`` gives
each the torchrun variables, so a multi-GPU, multi-node job is a DDP job. A job the scheduler
times out or preempts is requeued by submitit and resumes from the run's last checkpoint.
Submitted job ids are kept in ``OUT/jobs.json`` so that a repeated command does not submit a
run again while its job is still queued or running.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import submitit

from ..config import Config
from .distributed import DistContext, cleanup, init_distributed
from .logging import setup_logging
from .runs import RunSpec, train_run

log = logging.getLogger(__name__)

# Scheduler states of a job that will still write to its run folder.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


@dataclass
class Failure:
    spec: RunSpec
    message: str
    log_path: str | None = None


def _record_failure(spec: RunSpec, out: Path, error: BaseException) -> Failure:
    text = "".join(traceback.format_exception(error))
    path = spec.folder(out) / "error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log.error("run %s failed: %s (traceback in %s)", spec.label, error, path)
    return Failure(spec, f"{type(error).__name__}: {error}", str(path))


def run_local(cfg: Config, specs: Sequence[RunSpec], out: Path, ctx: DistContext,
              jobs: int = 1) -> list[Failure]:
    """Train ``specs`` here; a failed run is recorded (``error.txt``) and the others go on."""
    failures = []
    if jobs > 1 and not ctx.distributed:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_run, cfg.to_dict(), spec.to_dict(), str(out)): spec
                       for spec in specs}
            for future, spec in futures.items():
                try:
                    future.result()
                except Exception as error:
                    failures.append(_record_failure(spec, out, error))
        return failures
    for number, spec in enumerate(specs, 1):
        log.info("run %d/%d: %s", number, len(specs), spec.label)
        try:
            train_run(cfg.to_dict(), spec.to_dict(), str(out), ctx)
        except Exception as error:
            if ctx.distributed:
                raise  # the ranks would leave each other waiting in the next run
            failures.append(_record_failure(spec, out, error))
    return failures


class TrainJob(submitit.helpers.Checkpointable):
    """One run as a submitit job: every task joins the DDP group, rank 0 writes the record.

    ``checkpoint`` (inherited) resubmits the same call on timeout or preemption; the run
    resumes from ``checkpoints/last.pth`` (the trainer checkpoints every
    ``TRAIN.ckpt_every`` epochs), so at most the iterations since then are trained again.
    """

    def __init__(self, cfg_dict: dict, spec_dict: dict, out: str) -> None:
        self.cfg_dict, self.spec_dict, self.out = cfg_dict, spec_dict, out

    def __call__(self) -> dict:
        # CUDA_VISIBLE_DEVICES stays as slurm set it: with every GPU of the node visible the
        # rank takes GPU local_rank, with one GPU bound per task it takes that one.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        ctx = init_distributed(self.cfg_dict["TRAIN"]["device"])
        setup_logging(ctx.is_main)
        try:
            return train_run(self.cfg_dict, self.spec_dict, self.out, ctx)
        except Exception as error:
            if ctx.is_main:  # the report names it; submitit keeps the job's own log too
                _record_failure(RunSpec(**self.spec_dict), Path(self.out), error)
            raise
        finally:
            cleanup()


def tasks_per_node(slurm: Config) -> int:
    return slurm.tasks_per_node or slurm.gpus_per_node or 1


def slurm_parameters(cfg: Config, name: str = "mishkit-experiment") -> dict:
    """``EXPERIMENT.slurm`` as submitit's SlurmExecutor parameters (sbatch options)."""
    s = cfg.EXPERIMENT.slurm
    params = {
        "job_name": name, "time": s.time_min, "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(s), "cpus_per_task": s.cpus_per_task,
        "array_parallelism": s.array_parallelism,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if s[key]:
            params[key] = s[key]
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb}GB"
    if s.exclusive:
        params["exclusive"] = True
    if s.setup:
        params["setup"] = list(s.setup)
    if s.extra:
        params["additional_parameters"] = dict(option.split("=", 1) for option in s.extra)
    return params


def sbatch_preview(cfg: Config, folder: Path) -> str:
    """The sbatch script submitit writes for one job of the array (its private helper)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(cfg)
    params["map_count"] = None
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **params)


class SubmititLauncher:
    """Submits runs as submitit jobs: ``cluster="slurm"``, or ``"local"`` (submitit's local
    executor: the same jobs as subprocesses of this machine, for testing)."""

    def __init__(self, cfg: Config, out: Path, cluster: str = "slurm") -> None:
        if cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
        self.cfg, self.out, self.cluster = cfg, Path(out), cluster
        self.folder = self.out / "submitit"
        self.jobs_file = self.out / "jobs.json"

    def executor(self) -> submitit.Executor:
        slurm = self.cfg.EXPERIMENT.slurm
        if self.cluster == "slurm":
            executor = submitit.SlurmExecutor(self.folder, max_num_timeout=slurm.max_requeues)
            executor.update_parameters(**slurm_parameters(self.cfg))
            return executor
        executor = submitit.LocalExecutor(self.folder)
        executor.update_parameters(timeout_min=slurm.time_min, nodes=1,
                                   tasks_per_node=tasks_per_node(slurm))
        return executor

    def submitted(self) -> dict[str, dict]:
        if not self.jobs_file.is_file():
            return {}
        return json.loads(self.jobs_file.read_text(encoding="utf-8"))

    def job_state(self, job_id: str) -> str:
        if self.cluster == "local":  # a local job's id is its controller's process id
            try:
                os.kill(int(job_id), 0)
            except (ProcessLookupError, ValueError):
                return "FINISHED"
            except PermissionError:
                pass
            return "RUNNING"
        return submitit.SlurmJob(folder=self.folder, job_id=job_id).state

    def states(self) -> dict[str, dict]:
        """Folder key -> {job_id, state, stderr, active} of every job submitted so far."""
        found = {}
        for key, entry in self.submitted().items():
            state = self.job_state(entry["job_id"])
            found[key] = {"job_id": entry["job_id"], "state": state,
                          "stderr": entry.get("stderr"),
                          "active": state.split(" ")[0] in ACTIVE_STATES}
        return found

    def active(self) -> dict[str, tuple[str, str]]:
        """Folder key -> (job id, state) of submitted jobs that are still queued or running."""
        return {key: (job["job_id"], job["state"]) for key, job in self.states().items()
                if job["active"]}

    def submit(self, specs: Sequence[RunSpec]) -> list[submitit.Job]:
        """One job per run, as one array; their ids are added to ``jobs.json``."""
        if not specs:
            return []
        executor = self.executor()
        with executor.batch():  # the jobs get their ids when the array is submitted
            jobs = [executor.submit(TrainJob(self.cfg.to_dict(), spec.to_dict(), str(self.out)))
                    for spec in specs]
        return self._remember(specs, jobs)

    def _remember(self, specs: Sequence[RunSpec], jobs: list) -> list:
        entries = self.submitted()
        for spec, job in zip(specs, jobs):
            entries[run_key(spec, self.out)] = {"job_id": str(job.job_id), "run": spec.label,
                                                "cluster": self.cluster,
                                                "submitted_at": time.time(),
                                                "stderr": str(job.paths.stderr)}
        self.jobs_file.parent.mkdir(parents=True, exist_ok=True)
        self.jobs_file.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        return jobs

    def wait(self, specs: Sequence[RunSpec], jobs: Sequence[submitit.Job]) -> list[Failure]:
        failures = []
        for spec, job in zip(specs, jobs):
            try:
                job.results()
            except Exception as error:  # submitit re-raises the job's error with its log
                failures.append(Failure(spec, f"{type(error).__name__}: {error}",
                                        str(job.paths.stderr)))
        return failures


def run_key(spec: RunSpec, out: Path) -> str:
    return str(spec.folder(out).relative_to(out))
