"""The activation experiment: arms (activation × scope × fused BN) × LR grid × seeds, one report.

    python -m segmentation.experiment --cfg CFG [--out DIR] [--launcher local|slurm]
        [--dry-run] [--report-only] [--wait] [--jobs N] [--partition P] [--account A]
        [--nodes N] [--gpus-per-node G] [--time-min M] [KEY VALUE ...]

Each run trains with the config's schedule and batch, with ``TRAIN.seed = seed``: the batch
sampler and the weight initialisation depend on the seed only, so every arm sees the same data
in the same order and starts from the same weights. ``local`` trains the runs here
(``EXPERIMENT.jobs`` at a time); ``slurm`` submits one submitit job per run (a multi-GPU DDP
job with ``EXPERIMENT.slurm``'s resources) and returns, or waits with ``--wait``. Finished runs
are reused and interrupted ones resume from their last checkpoint, so repeating the command
continues the experiment. Every command ends by writing ``report.md``, ``report.json`` and
``report.png`` to the experiment folder from the runs finished so far, listing those missing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import Config, ConfigError
from .engine.distributed import DistContext, cleanup, init_distributed
from .engine.launch import Failure, SubmititLauncher, run_key, run_local, sbatch_preview
from .engine.launch import tasks_per_node as slurm_tasks_per_node
from .engine.logging import setup_logging
from .engine.runs import RunConflictError, RunState, plan_runs, run_state
from .train import common_parser, load_or_exit

log = logging.getLogger(__name__)

_FLAGS = {"partition": "partition", "account": "account", "nodes": "nodes",
          "gpus_per_node": "gpus_per_node", "time_min": "time_min"}


def _max_iters(cfg: Config) -> int | None:
    t = cfg.TRAIN
    return t.max_iters or (t.num_epoch * t.epoch_iters if t.epoch_iters else None)


def _missing(state: RunState, out: Path, jobs: dict, failures: dict, cfg: Config) -> dict:
    folder = state.spec.folder(out)
    key = run_key(state.spec, out)
    entry = {"run": state.spec.label, "folder": str(folder)}
    total = _max_iters(cfg)
    progress = (f"checkpointed; last logged iteration {state.iteration}"
                + (f" of {total}" if total else "")) if state.status == "partial" else ""
    job = jobs.get(key)
    if job and job["active"]:
        return {**entry, "state": f"{job['state'].lower()} (job {job['job_id']})",
                "detail": progress}
    failure = failures.get(key)
    error_file = folder / "error.txt"
    if failure is not None or error_file.is_file():
        message = failure.message if failure else error_file.read_text(
            encoding="utf-8").strip().splitlines()[-1]
        where = failure.log_path if failure and failure.log_path else str(error_file)
        return {**entry, "state": "failed", "detail": f"{message} (log: {where})"}
    if job:  # ended without a result or a Python error: killed, out of memory, node failure
        return {**entry, "state": "failed",
                "detail": f"job {job['job_id']} ended {job['state']} (log: {job['stderr']}); "
                          "submitted again when the command is repeated"}
    if state.status == "partial":
        return {**entry, "state": "interrupted", "detail": progress + "; resumes when run again"}
    return {**entry, "state": "not started", "detail": ""}


def gather(cfg: Config, out: Path, name: str, *, jobs: dict | None = None,
           failures: Sequence[Failure] = (), wall_time_s: float | None = None,
           throughput_note: str = "") -> dict:
    """The report from every finished run; the others are listed as missing (``jobs``: the
    submitit launcher's job states, to say which are queued, running or ended badly)."""
    from .engine.analysis import analyse, select_learning_rates
    from .engine.equivalence import same_function_groups
    from .engine.perimage import per_image_comparison
    from .engine.report import write_report

    specs = plan_runs(cfg)
    states = [run_state(cfg, spec, out) for spec in specs]
    records = [state.record for state in states if state.status == "finished"]
    failed = {run_key(f.spec, out): f for f in failures}
    missing = [_missing(state, out, jobs or {}, failed, cfg) for state in states
               if state.status != "finished"]
    exp = cfg.EXPERIMENT
    arms = [dict(arm) for arm in exp.arms]
    chosen = select_learning_rates(records, [a["name"] for a in arms])
    folders = {(state.spec.arm, state.spec.seed): state.spec.folder(out) for state in states
               if state.status == "finished"
               and state.spec.lr_scale == chosen[state.spec.arm]["chosen"]}
    per_image = per_image_comparison(folders, [a["name"] for a in arms], exp.baseline,
                                     resamples=exp.bootstrap_resamples)
    summary = analyse(records, arms, exp.baseline, alpha=exp.alpha, power=exp.power,
                      deltas=exp.deltas, same_function=same_function_groups(cfg, arms),
                      per_image=per_image)
    world = max(((r.get("machine") or {}).get("world_size", 1) for r in records), default=1)
    meta = {
        "config": name, "model": f"{cfg.MODEL.arch_encoder}+{cfg.MODEL.arch_decoder}",
        "iterations": records[0]["iterations"] if records else _max_iters(cfg),
        "batch": cfg.TRAIN.batch_size_per_gpu * world, "seeds": list(exp.seeds),
        "lr_grid": [float(m) for m in exp.lr_grid], "lr_encoder": cfg.TRAIN.lr_encoder,
        "lr_decoder": cfg.TRAIN.lr_decoder, "planned_runs": len(specs),
        "finished_runs": len(records), "wall_time_s": wall_time_s,
        "throughput_note": throughput_note,
    }
    return write_report(out, summary, meta, records, missing)


def run_experiment(cfg: Config, out: Path, ctx: DistContext | None = None, jobs: int = 1,
                   name: str = "config") -> dict:
    """Train every missing run here (``jobs`` at a time), then write the report; returns the
    report's JSON content. Failed runs are listed in it (with their ``error.txt``)."""
    from .engine.builders import prepare_dataset

    ctx = ctx or DistContext()
    start = time.perf_counter()
    todo = [spec for spec in plan_runs(cfg) if run_state(cfg, spec, out).status != "finished"]
    failures = []
    if todo:
        prepare_dataset(cfg, ctx)  # once, before any run (and before worker processes start)
        failures = run_local(cfg, todo, out, ctx, jobs)
    if not ctx.is_main:
        return {}
    note = (f"Local launcher: up to {jobs} run(s) at a time; CPU runs also share the machine "
            "with whatever else ran (see the load column).")
    return gather(cfg, out, name, failures=failures, wall_time_s=time.perf_counter() - start,
                  throughput_note=note)


def describe_plan(cfg: Config, out: Path, states: Sequence[RunState], todo: Sequence[RunState],
                  active: dict, launcher: str, jobs: int) -> str:
    """What a command would train or submit, run by run."""
    count = {s: sum(1 for st in states if st.status == s) for s in ("finished", "partial", "new")}
    lines = [f"experiment folder {out}: {len(states)} runs planned; {count['finished']} "
             f"finished (reused), {len(active)} queued or running (left alone), "
             f"{len(todo)} to {'submit' if launcher == 'slurm' else 'train'} "
             f"({sum(1 for st in todo if st.status == 'partial')} resuming from a checkpoint)"]
    for state in states:
        key = run_key(state.spec, out)
        if key in active:
            what = f"{active[key][1].lower()} as job {active[key][0]}"
        elif state.status == "finished":
            what = "finished, reused"
        elif state.status == "partial":
            what = f"resume from checkpoints/last.pth (last logged iteration {state.iteration})"
        else:
            what = "train from scratch"
        lines.append(f"  {state.spec.label:<32} {state.spec.folder(out)}  [{what}]")
    if launcher == "local":
        lines.append(f"local: {jobs} run(s) at a time in this machine's processes, device "
                     f"{cfg.TRAIN.device}, {cfg.TRAIN.num_threads or 'default'} thread(s) each")
        return "\n".join(lines)
    s = cfg.EXPERIMENT.slurm
    ranks = s.nodes * slurm_tasks_per_node(s)
    lines += [f"slurm: {len(todo)} job(s) as one submitit array; each job {s.nodes} node(s) × "
              f"{slurm_tasks_per_node(s)} task(s) = {ranks} DDP rank(s), {s.gpus_per_node} "
              f"GPU(s) per node, batch {cfg.TRAIN.batch_size_per_gpu} per rank "
              f"(global {cfg.TRAIN.batch_size_per_gpu * ranks}); time limit {s.time_min} min, "
              f"requeued (resuming) up to {s.max_requeues} time(s) after timeouts; logs in "
              f"{out / 'submitit'}", "sbatch script of one job:", "",
              sbatch_preview(cfg, out / "submitit")]
    return "\n".join(lines)


def _parser():
    parser = common_parser("python -m segmentation.experiment", __doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="experiment folder (default DIR)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="train here (local) or submit one submitit job per run (slurm)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be trained or submitted, and do nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished runs; train/submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="slurm: wait for the submitted jobs, then write the report")
    parser.add_argument("--jobs", type=int, default=None,
                        help="local: runs in parallel processes (default EXPERIMENT.jobs)")
    for flag, key in _FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None,
                            help=f"slurm: EXPERIMENT.slurm.{key}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    opts = list(args.opts)
    for flag, key in _FLAGS.items():
        if getattr(args, flag) is not None:
            opts += [f"EXPERIMENT.slurm.{key}", getattr(args, flag)]
    cfg = load_or_exit(parser, args.cfg, opts)
    out = Path(args.out or cfg.DIR)
    jobs = args.jobs if args.jobs is not None else cfg.EXPERIMENT.jobs
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    local = args.launcher == "local"
    ctx = init_distributed(cfg.TRAIN.device) if local and not args.dry_run else DistContext()
    setup_logging(ctx.is_main)
    try:
        return _run(args, cfg, out, ctx, jobs)
    except (ConfigError, RunConflictError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    finally:
        cleanup()


def _run(args, cfg: Config, out: Path, ctx: DistContext, jobs: int) -> int:
    from .engine.builders import prepare_dataset

    start = time.perf_counter()
    states = [run_state(cfg, spec, out) for spec in plan_runs(cfg)]
    launcher = SubmititLauncher(cfg, out) if args.launcher == "slurm" else None
    active = launcher.active() if launcher else {}
    todo = [st for st in states if st.status != "finished" and run_key(st.spec, out) not in active]
    if args.dry_run:
        print(describe_plan(cfg, out, states, todo, active, args.launcher, jobs))
        return 0
    if launcher is None:
        if args.report_only:
            report = gather(cfg, out, args.cfg) if ctx.is_main else {}
        else:
            report = run_experiment(cfg, out, ctx, jobs, args.cfg)
        return _print_report(out, report) if ctx.is_main else 0
    failures: list[Failure] = []
    if not args.report_only and todo:
        prepare_dataset(cfg, ctx)
        submitted = launcher.submit([st.spec for st in todo])
        for state, job in zip(todo, submitted):
            print(f"submitted {state.spec.label}: job {job.job_id}")
        if args.wait:
            failures = launcher.wait([st.spec for st in todo], submitted)
    exclusive = cfg.EXPERIMENT.slurm.exclusive
    note = (f"Slurm jobs {'with' if exclusive else 'without'} exclusive nodes"
            + ("." if exclusive else ": other users' jobs may have shared a node."))
    report = gather(cfg, out, args.cfg, jobs=launcher.states(), failures=failures,
                    wall_time_s=time.perf_counter() - start, throughput_note=note)
    return _print_report(out, report, failed=bool(failures))


def _print_report(out: Path, report: dict, failed: bool = False) -> int:
    print((out / "report.md").read_text(encoding="utf-8"))
    meta = report["meta"]
    wall = "" if meta["wall_time_s"] is None else f"; wall time {meta['wall_time_s']:.0f} s"
    print(f"{meta['finished_runs']} of {meta['planned_runs']} runs finished{wall}; report in "
          f"{out}")
    return 1 if failed or "failed" in {m["state"] for m in report["missing"]} else 0


if __name__ == "__main__":
    sys.exit(main())
