"""One experiment run, (arm, learning-rate multiplier, seed): its config, folder, state, training.

A run lives in ``OUT/runs/<arm>/[lr_<m>/]seed_<s>/``. It always resumes: a folder holding
``checkpoints/last.pth`` (an interrupted or requeued run) continues from it, and a folder
holding ``result.json`` is finished and reused. Either must belong to the same config (keys
that cannot change the result, :data:`RESULT_NEUTRAL_KEYS`, aside): another config in the
folder is an error naming the differing keys, never silently overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import Config, arm_fuse_bn
from .checkpoint import atomic_save
from .distributed import DistContext, barrier
from .logging import read_metrics, setup_logging

log = logging.getLogger(__name__)

# The experiment's own settings, how a run is started, and what only changes logging or the
# speed of evaluation.
RESULT_NEUTRAL_KEYS = ("EXPERIMENT", "TRAIN.resume", "TRAIN.progress", "TRAIN.tensorboard",
                       "VAL.workers", "VAL.visualize", "VAL.visualize_max")


class RunConflictError(RuntimeError):
    """A run folder that holds a run of another config."""


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    lr_scale: float | None = None  # multiplier of the config's LRs; None: no LR grid

    @property
    def label(self) -> str:
        lr = "" if self.lr_scale is None else f" lr×{self.lr_scale:g}"
        return f"{self.arm}{lr} seed {self.seed}"

    def folder(self, out: Path) -> Path:
        lr = [] if self.lr_scale is None else [f"lr_{self.lr_scale:g}"]
        return Path(out, "runs", self.arm, *lr, f"seed_{self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_runs(cfg: Config) -> list[RunSpec]:
    """Every (arm, LR multiplier, seed), seed-major so that partial results stay balanced."""
    scales = [float(m) for m in cfg.EXPERIMENT.lr_grid] or [None]
    return [RunSpec(arm["name"], int(seed), scale) for seed in cfg.EXPERIMENT.seeds
            for scale in scales for arm in cfg.EXPERIMENT.arms]


def arm_of(cfg: Config, name: str) -> dict:
    for arm in cfg.EXPERIMENT.arms:
        if arm["name"] == name:
            return dict(arm)
    raise KeyError(f"no arm {name!r} in EXPERIMENT.arms")


def _network_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    """The run's config before its data-order offset: activation settings, seed, LRs, folder."""
    arm = arm_of(cfg, spec.arm)
    run = Config(cfg.to_dict())
    run.MODEL.activation = arm["activation"]
    run.MODEL.activation_scope = arm.get("scope", "all")
    run.MODEL.fuse_bn = arm_fuse_bn(arm)
    run.TRAIN.seed = spec.seed
    if spec.lr_scale is not None:
        run.TRAIN.lr_encoder = cfg.TRAIN.lr_encoder * spec.lr_scale
        run.TRAIN.lr_decoder = cfg.TRAIN.lr_decoder * spec.lr_scale
    run.TRAIN.resume = "auto"  # a requeued or repeated run continues from its last checkpoint
    run.TRAIN.ckpt_dir = ""
    if run.TRAIN.eval_every <= 0:
        run.TRAIN.eval_every = run.TRAIN.num_epoch  # the final validation at least
    run.DIR = str(spec.folder(out))
    return run


def run_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    """The config one run trains with.

    An arm with ``data_seed`` trains with ``TRAIN.seed = seed + data_seed`` (data order and
    training randomness) from the initial weights of ``seed``, which the run writes to
    ``init/`` and loads through ``MODEL.weights_*`` (kept where the config sets them already).
    """
    run = _network_config(cfg, spec, out)
    offset = arm_of(cfg, spec.arm).get("data_seed", 0)
    if offset:
        run.TRAIN.seed = spec.seed + offset
        init = Path(run.DIR) / "init"
        run.MODEL.weights_encoder = run.MODEL.weights_encoder or str(init / "encoder.pth")
        run.MODEL.weights_decoder = run.MODEL.weights_decoder or str(init / "decoder.pth")
    return run


def config_differences(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """Flat keys whose values differ between two config dicts (result-neutral keys aside)."""
    keys = []
    for key in sorted(set(found) | set(expected)):
        path = f"{prefix}{key}"
        if path in RESULT_NEUTRAL_KEYS:
            continue
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


@dataclass
class RunState:
    spec: RunSpec
    status: str  # finished | partial | new
    iteration: int | None = None  # partial: the last logged training iteration
    record: dict | None = None  # finished: the result record


def _check_same_config(folder: Path, found: dict, expected: dict, what: str) -> None:
    differences = config_differences(found, expected)
    if differences:
        shown = ", ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
        raise RunConflictError(
            f"{folder} holds {what} of another config (it differs in {shown}); delete that "
            "folder or give the experiment another --out")


def run_state(cfg: Config, spec: RunSpec, out: Path) -> RunState:
    """Finished (reusable result), partial (a checkpoint to resume from) or new."""
    import yaml

    folder = spec.folder(out)
    expected = run_config(cfg, spec, out).to_dict()
    result = folder / "result.json"
    if result.is_file():
        record = json.loads(result.read_text(encoding="utf-8"))
        _check_same_config(folder, record.get("config", {}), expected, "a finished run")
        record.setdefault("lr_scale", None)  # records written before the LR grid existed
        return RunState(spec, "finished", record.get("iterations"), record)
    if (folder / "checkpoints" / "last.pth").is_file():
        config_file = folder / "config.yaml"
        found = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() \
            else {}
        _check_same_config(folder, found, expected, "a checkpointed run")
        return RunState(spec, "partial", _last_logged_step(folder / "metrics.jsonl"))
    return RunState(spec, "new")


def _last_logged_step(path: Path) -> int | None:
    try:
        records = read_metrics(path, "train")
    except (OSError, ValueError):
        return None
    return records[-1]["step"] if records else None


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the log records up to ``iteration`` (what a resumed run would log again goes).

    A last line cut off by a kill is dropped too; a broken line before it is an error.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        if record.get("step", 0) <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_initial_weights(cfg: Config, spec: RunSpec, out: Path, ctx: DistContext) -> None:
    """``init/{encoder,decoder}.pth``: the weights the run of ``spec.seed`` starts from."""
    from .builders import build_segmentation_model
    from .trainer import seed_everything

    run = run_config(cfg, spec, out)
    base = _network_config(cfg, spec, out)
    targets = {part: Path(getattr(run.MODEL, f"weights_{part}"))
               for part in ("encoder", "decoder")
               if getattr(run.MODEL, f"weights_{part}") != getattr(base.MODEL, f"weights_{part}")}
    if ctx.is_main and not all(path.is_file() for path in targets.values()):
        seed_everything(spec.seed)  # exactly what the trainer does before building the model
        model = build_segmentation_model(base, DistContext(), pretrained=False)
        for part, path in targets.items():
            atomic_save(getattr(model, part).state_dict(), path)
    barrier()


def machine_snapshot(ctx: DistContext) -> dict:
    """Where and when a run trains: host, CPU, device, threads, load, scheduler job."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "host": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(),
        "device": (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                   else "cpu"),
        "threads": torch.get_num_threads(), "world_size": ctx.world_size,
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "nodes": os.environ.get("SLURM_JOB_NODELIST"),
    }


def _curves(metrics_path: Path) -> tuple[list, list, dict]:
    train = read_metrics(metrics_path, "train")
    val = read_metrics(metrics_path, "val")
    if not val:
        raise RuntimeError(f"{metrics_path}: the run wrote no validation record")
    return ([[r["step"], r["loss"]] for r in train], [[r["step"], r["miou"]] for r in val],
            val[-1])


def train_run(cfg_dict: dict, spec_dict: dict, out: str, ctx: DistContext | None = None
              ) -> dict:
    """Train and validate one run (resuming, or reusing it when finished); its result record,
    also saved as ``result.json`` in its folder."""
    from .trainer import Trainer

    cfg, spec, out_path = Config(cfg_dict), RunSpec(**spec_dict), Path(out)
    state = run_state(cfg, spec, out_path)
    if state.status == "finished":
        return state.record
    if ctx is None:
        setup_logging(True)
        ctx = DistContext()
    run = run_config(cfg, spec, out_path)
    if arm_of(cfg, spec.arm).get("data_seed", 0):
        write_initial_weights(cfg, spec, out_path, ctx)
    load_start, started = os.getloadavg()[0], time.time()
    trainer = Trainer(run, ctx)  # resumes from checkpoints/last.pth when there is one
    machine = machine_snapshot(ctx)  # after the trainer has set the thread count
    resumed_from = trainer.iteration
    folder = Path(run.DIR)
    if ctx.is_main:
        truncate_metrics(folder / "metrics.jsonl", resumed_from)
        attempt = {"pid": os.getpid(), "host": machine["host"], "started_at": started,
                   "resumed_from": resumed_from, "slurm_job": machine["slurm_job"]}
        (folder / "attempt.json").write_text(json.dumps(attempt) + "\n", encoding="utf-8")
    result = trainer.train()
    trainer.close()
    if not ctx.is_main:
        return {}
    loss, miou, final = _curves(folder / "metrics.jsonl")
    record = {
        "arm": spec.arm, "seed": spec.seed, "lr_scale": spec.lr_scale,
        "lr_encoder": run.TRAIN.lr_encoder, "lr_decoder": run.TRAIN.lr_decoder,
        "miou": final.get("miou"), "pixel_acc": final.get("pixel_acc"),
        "score": final.get("score"), "mean_class_acc": final.get("mean_class_acc"),
        "images_per_s": result["images_per_s"], "train_seconds": result["seconds"],
        "iterations": result["iteration"], "resumed_from": resumed_from,
        "machine": {**machine, "started_at": started, "finished_at": time.time(),
                    "load_start": load_start, "load_end": os.getloadavg()[0]},
        "loss_curve": loss, "miou_curve": miou, "config": run.to_dict(),
    }
    (folder / "result.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (folder / "error.txt").unlink(missing_ok=True)
    return record
