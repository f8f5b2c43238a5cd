"""The experiment report: per-arm statistics, paired differences to the baseline arm, curves.

Input: one record per (arm, seed) run with its final validation metrics, training throughput
and the loss / mIoU curves read from its metrics log. Output: ``report.json``,
``report.md`` and ``report.png`` in the experiment folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .stats import mean_std, paired_difference

METRICS = ("miou", "pixel_acc", "images_per_s")
_LABELS = {"miou": "mIoU %", "pixel_acc": "pixel acc %", "images_per_s": "train images/s"}
_PERCENT = {"miou", "pixel_acc"}


def summarize(runs: Sequence[dict], arms: Sequence[dict], baseline: str) -> dict:
    """Per-arm per-seed values, mean ± std, and paired differences to ``baseline``.

    Differences are paired by seed (same data order, same initial weights), so the CI is
    over the per-seed differences: mean ± t_{0.975, n-1} · sd / sqrt(n).
    """
    by_arm: dict[str, dict[int, dict]] = {arm["name"]: {} for arm in arms}
    for run in runs:
        by_arm[run["arm"]][run["seed"]] = run
    seeds = sorted({run["seed"] for run in runs})
    summary: dict = {"baseline": baseline, "seeds": seeds, "arms": {}}
    for arm in arms:
        name = arm["name"]
        per_seed = {m: [by_arm[name][s][m] for s in seeds if s in by_arm[name]] for m in METRICS}
        stats = {m: dict(zip(("mean", "std"), mean_std(v))) for m, v in per_seed.items()}
        entry = {"spec": dict(arm), "per_seed": per_seed, "stats": stats}
        common = [s for s in seeds if s in by_arm[name] and s in by_arm.get(baseline, {})]
        if name != baseline and common:
            entry["vs_baseline"] = {
                m: paired_difference([by_arm[name][s][m] for s in common],
                                     [by_arm[baseline][s][m] for s in common])
                for m in METRICS
            }
        summary["arms"][name] = entry
    return summary


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if metric in _PERCENT else f"{value:.1f}"


def _signed(value: float, metric: str) -> str:
    text = _fmt(value, metric)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def markdown(summary: dict, meta: dict) -> str:
    arms = summary["arms"]
    lines = [
        f"# Activation experiment: {meta['config']}",
        "",
        f"{len(arms)} arms × {len(summary['seeds'])} seeds {summary['seeds']}; model "
        f"{meta['model']}; {meta['iterations']} iterations of batch {meta['batch']} per run; "
        f"device {meta['device']}, {meta['threads']} thread(s) per run, {meta.get('jobs', 1)} "
        f"run(s) at a time (images/s is measured under that sharing). Wall time "
        f"{meta['wall_time_s']:.0f} s.",
        "",
        "## Per arm (mean ± std over seeds)",
        "",
        "| arm | activation | scope | fused BN | " + " | ".join(_LABELS[m] for m in METRICS) + " |",
        "|---|---|---|---|" + "---:|" * len(METRICS),
    ]
    for name, entry in arms.items():
        spec = entry["spec"]
        cells = [f"{_fmt(entry['stats'][m]['mean'], m)} ± {_fmt(entry['stats'][m]['std'], m)}"
                 for m in METRICS]
        lines.append(f"| {name} | {spec['activation']} | {spec.get('scope', 'all')} | "
                     f"{spec.get('fuse_bn', False)} | " + " | ".join(cells) + " |")
    lines += ["", f"## Paired difference to `{summary['baseline']}` (95% CI, Student t over seeds)",
              "", "| arm | " + " | ".join(f"Δ {_LABELS[m]}" for m in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS)]
    for name, entry in arms.items():
        if "vs_baseline" not in entry:
            continue
        cells = [f"{_signed(d['mean'], m)} [{_signed(d['ci_low'], m)}, {_signed(d['ci_high'], m)}]"
                 for m, d in entry["vs_baseline"].items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Per seed", "", "| arm | seed | " + " | ".join(_LABELS[m] for m in METRICS)
              + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for name, entry in arms.items():
        for i, seed in enumerate(summary["seeds"][: len(entry["per_seed"]["miou"])]):
            cells = [_fmt(entry["per_seed"][m][i], m) for m in METRICS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Curves: `report.png` (training loss and validation mIoU, mean over seeds).", ""]
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], arms: Sequence[dict], path: Path) -> Path:
    """Training loss and validation mIoU against iteration, one line per arm (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        arm_runs = [r for r in runs if r["arm"] == arm["name"]]
        for axis, key, metric in ((axes[0], "loss_curve", "loss"), (axes[1], "miou_curve", "miou")):
            curves = [r[key] for r in arm_runs if r[key]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [point[0] for point in curves[0][:length]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(length)]
            scale = 100 if metric == "miou" else 1
            (line,) = axis.plot(steps, [scale * v for v in mean], label=arm["name"])
            for curve in curves:  # individual seeds, faint
                axis.plot([p[0] for p in curve], [scale * p[1] for p in curve],
                          color=line.get_color(), alpha=0.2, linewidth=0.8)
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    axes[1].set(title="validation mIoU", xlabel="iteration", ylabel="mIoU %")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, runs: Sequence[dict], arms: Sequence[dict], baseline: str,
                 meta: dict) -> dict:
    """Write report.json / report.md / report.png; returns the JSON content."""
    summary = summarize(runs, arms, baseline)
    content = {"meta": meta, **summary, "runs": list(runs)}
    text = json.dumps(_finite(content), indent=2, allow_nan=False)
    (out_dir / "report.json").write_text(text + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(summary, meta), encoding="utf-8")
    plot_curves(runs, arms, out_dir / "report.png")
    return content


def _finite(value):
    """NaN/inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
