"""The activation experiment: arms (activation × scope × fused BN) × seeds, one report.

    python -m segmentation.experiment --cfg segmentation/configs/synthetic-experiment.yaml \\
        --out runs/experiment [KEY VALUE ...]

Each (arm, seed) run trains with the config's schedule and batch, with ``TRAIN.seed = seed``:
the batch sampler and the weight initialisation depend on the seed only, so every arm sees the
same data in the same order and starts from the same weights. Writes ``report.md``,
``report.json`` and ``report.png`` to ``--out``; finished runs (``runs/<arm>/seed_<s>/
result.json`` with the same config) are reused when the command is repeated.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from .config import Config, ConfigError
from .engine.distributed import DistContext, cleanup, init_distributed
from .engine.logging import read_metrics, setup_logging
from .train import common_parser, load_or_exit

log = logging.getLogger(__name__)


def run_config(cfg: Config, arm: dict, seed: int, out: Path) -> Config:
    """The config of one run: the arm's activation settings and the seed, its own folder."""
    run = Config(cfg.to_dict())
    run.MODEL.activation = arm["activation"]
    run.MODEL.activation_scope = arm.get("scope", "all")
    fuse_bn = arm.get("fuse_bn", False)
    run.MODEL.fuse_bn = fuse_bn if fuse_bn in ("input", "output") else bool(fuse_bn)
    run.TRAIN.seed = int(seed)
    run.TRAIN.resume = ""
    run.TRAIN.ckpt_dir = ""
    if run.TRAIN.eval_every <= 0:
        run.TRAIN.eval_every = run.TRAIN.num_epoch  # the final validation at least
    run.DIR = str(out / "runs" / arm["name"] / f"seed_{seed}")
    return run


def _curves(metrics_path: Path) -> tuple[list, list, dict]:
    train = read_metrics(metrics_path, "train")
    val = read_metrics(metrics_path, "val")
    if not val:
        raise RuntimeError(f"{metrics_path}: the run wrote no validation record")
    loss = [[r["step"], r["loss"]] for r in train]
    miou = [[r["step"], r["miou"]] for r in val]
    return loss, miou, val[-1]


def run_one(cfg_dict: dict, arm: dict, seed: int, out: str, ctx: DistContext | None = None
            ) -> dict:
    """Train and validate one (arm, seed); returns its result record (also saved as JSON)."""
    from .engine.trainer import Trainer

    cfg = run_config(Config(cfg_dict), arm, seed, Path(out))
    run_dir = Path(cfg.DIR)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        cached = json.loads(result_path.read_text(encoding="utf-8"))
        if cached.get("config") == cfg.to_dict():
            return cached
    if ctx is None:
        setup_logging(True)
        ctx = DistContext()
    if (run_dir / "metrics.jsonl").exists() and ctx.is_main:
        (run_dir / "metrics.jsonl").unlink()  # a stale or interrupted run: start the log afresh
    trainer = Trainer(cfg, ctx)
    result = trainer.train()
    trainer.close()
    loss, miou, final = _curves(run_dir / "metrics.jsonl") if ctx.is_main else ([], [], {})
    record = {
        "arm": arm["name"], "seed": int(seed),
        "miou": final.get("miou"), "pixel_acc": final.get("pixel_acc"),
        "score": final.get("score"), "mean_class_acc": final.get("mean_class_acc"),
        "images_per_s": result["images_per_s"], "train_seconds": result["seconds"],
        "iterations": result["iteration"], "loss_curve": loss, "miou_curve": miou,
        "config": cfg.to_dict(),
    }
    if ctx.is_main:
        result_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def run_experiment(cfg: Config, out: Path, ctx: DistContext, jobs: int = 1,
                   name: str = "config") -> dict:
    """Every arm × seed (seed-major, so partial results stay balanced), then the report."""
    from .engine.builders import prepare_dataset
    from .engine.report import write_report

    arms = [dict(arm) for arm in cfg.EXPERIMENT.arms]
    names = [arm["name"] for arm in arms]
    if cfg.EXPERIMENT.baseline not in names:
        raise ConfigError(f"EXPERIMENT.baseline {cfg.EXPERIMENT.baseline!r} is not an arm: {names}")
    out.mkdir(parents=True, exist_ok=True)
    prepare_dataset(cfg, ctx)  # once, before any run (and before worker processes start)
    start = time.perf_counter()
    tasks = [(arm, seed) for seed in cfg.EXPERIMENT.seeds for arm in arms]
    if jobs > 1 and not ctx.distributed:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, cfg.to_dict(), arm, seed, str(out))
                       for arm, seed in tasks]
            runs = [f.result() for f in futures]
    else:
        runs = []
        for arm, seed in tasks:
            log.info("run %d/%d: arm %s, seed %d", len(runs) + 1, len(tasks), arm["name"], seed)
            runs.append(run_one(cfg.to_dict(), arm, seed, str(out), ctx))
    wall = time.perf_counter() - start
    if not ctx.is_main:
        return {}
    import torch

    meta = {
        "config": name,
        "model": f"{cfg.MODEL.arch_encoder}+{cfg.MODEL.arch_decoder}",
        "iterations": runs[0]["iterations"], "batch": cfg.TRAIN.batch_size_per_gpu * ctx.world_size,
        "device": str(ctx.device), "threads": cfg.TRAIN.num_threads or torch.get_num_threads(),
        "jobs": jobs, "world_size": ctx.world_size, "wall_time_s": wall,
    }
    return write_report(out, [{k: v for k, v in r.items() if k != "config"} for r in runs],
                        arms, cfg.EXPERIMENT.baseline, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser("python -m segmentation.experiment", __doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="experiment folder (default DIR)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in parallel processes (default EXPERIMENT.jobs)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(parser, args.cfg, args.opts)
    ctx = init_distributed(cfg.TRAIN.device)
    setup_logging(ctx.is_main)
    out = Path(args.out or cfg.DIR)
    try:
        jobs = args.jobs if args.jobs is not None else cfg.EXPERIMENT.jobs
        report = run_experiment(cfg, out, ctx, jobs=jobs, name=args.cfg)
        if ctx.is_main:
            print((out / "report.md").read_text(encoding="utf-8"))
            print(f"wall time {report['meta']['wall_time_s']:.0f} s; report in {out}")
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
