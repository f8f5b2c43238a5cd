"""The experiment report: ``report.json``, ``report.md`` and ``report.png`` in the experiment
folder, from the summary of ``analysis.analyse`` and the list of runs still missing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

_PERCENT = {"miou", "pixel_acc", "mean_iou", "pixel_accuracy"}


def _fmt(value, metric: str = "miou") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.2f}" if metric in _PERCENT else f"{value:.1f}"


def _signed(value, metric: str = "miou") -> str:
    text = _fmt(value, metric)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def _p(value) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _interval(d: dict, metric: str) -> str:
    return f"{_signed(d['mean'], metric)} [{_signed(d['ci_low'], metric)}, " \
           f"{_signed(d['ci_high'], metric)}]"


def _lr(scale) -> str:
    return "config" if scale is None else f"×{scale:g}"


def _header(summary: dict, meta: dict, missing: Sequence[dict]) -> list[str]:
    arms = summary["arms"]
    finished = meta["finished_runs"]
    lines = [f"# Activation experiment: {meta['config']}", "",
             f"{len(arms)} arms × {len(meta['seeds'])} seeds {meta['seeds']}"
             + (f" × {len(meta['lr_grid'])} learning rates" if meta["lr_grid"] else "")
             + f"; model {meta['model']}; {meta['iterations']} iterations of batch "
             f"{meta['batch']} per run. {finished} of {meta['planned_runs']} runs finished"
             + (f"; wall time of this command {meta['wall_time_s']:.0f} s."
                if meta.get("wall_time_s") is not None else "."), ""]
    if missing:
        lines += ["## Missing runs", "",
                  f"The report covers the {finished} finished run(s); {len(missing)} "
                  "run(s) are not in it yet:", "", "| run | state | detail |", "|---|---|---|"]
        lines += [f"| {m['run']} | {m['state']} | {m['detail']} |" for m in missing]
        lines.append("")
    return lines


def _lr_section(summary: dict, meta: dict) -> list[str]:
    if not meta["lr_grid"]:
        return ["## Learning rate", "",
                f"Every arm trains with the config's learning rates (encoder "
                f"{meta['lr_encoder']:g}, decoder {meta['lr_decoder']:g}); no per-arm search "
                "(`EXPERIMENT.lr_grid` is empty), so an arm whose best learning rate differs "
                "from the baseline's is at a disadvantage.", ""]
    lines = ["## Learning rate (chosen per arm on validation)", "",
             f"Each arm's learning rate is chosen from the grid {meta['lr_grid']} × the "
             f"config's (encoder {meta['lr_encoder']:g}, decoder {meta['lr_decoder']:g}) by "
             "the best mean validation mIoU over its seeds. The validation set is the one "
             "reported, so each arm's score is a best-of-grid and biased upward by a similar "
             "amount for every arm; the tables below use the chosen runs.", "",
             "| arm | " + " | ".join(_lr(s) for s in meta["lr_grid"]) + " | chosen |",
             "|---|" + "---:|" * len(meta["lr_grid"]) + "---|"]
    for arm, sel in summary["lr_selection"].items():
        cells = {g["lr_scale"]: f"{_fmt(g['mean'])} ± {_fmt(g['std'])} (n={g['n']})"
                 for g in sel["grid"]}
        lines.append(f"| {arm} | " + " | ".join(cells.get(s, "—") for s in meta["lr_grid"])
                     + f" | {_lr(sel['chosen']) if sel['chosen'] is not None else '—'} |")
    return [*lines, ""]


def _arm_table(summary: dict) -> list[str]:
    lines = ["## Per arm (mean ± std over seeds)", "",
             "| arm | activation | scope | fused BN | data seed | LR | seeds | mIoU % | "
             "pixel acc % |", "|---|---|---|---|---:|---|---:|---:|---:|"]
    for name, entry in summary["arms"].items():
        spec, st = entry["spec"], entry["stats"]
        lines.append(
            f"| {name} | {spec['activation']} | {spec.get('scope', 'all')} | "
            f"{spec.get('fuse_bn', False)} | {spec.get('data_seed', 0)} | "
            f"{_lr(summary['lr_selection'][name]['chosen']) if entry['seeds'] else '—'} | "
            f"{len(entry['seeds'])} | "
            f"{_fmt(st['miou']['mean'])} ± {_fmt(st['miou']['std'])} | "
            f"{_fmt(st['pixel_acc']['mean'])} ± {_fmt(st['pixel_acc']['std'])} |")
    return [*lines, ""]


def _same_function_section(summary: dict) -> list[str]:
    lines = ["## Arms that compute the same function", ""]
    if not summary["same_function"]:
        return [*lines, "None: every arm's network computes a different function (probed: "
                "same weights, float64 outputs on one input).", ""]
    for group in summary["same_function"]:
        lines.append(f"- {', '.join(f'`{a}`' for a in group['arms'])}: same outputs from the "
                     f"same weights (largest relative difference "
                     f"{group['max_relative_difference']:.1e} on a float64 probe); they differ "
                     "only in floating-point order or data order, so any gap between them is "
                     "noise (an A/A comparison).")
    return [*lines, ""]


def _noise_section(summary: dict) -> list[str]:
    noise, alpha = summary["noise"], summary["alpha"]
    power = f"{100 * summary['power']:.0f}%"
    lines = ["## Noise floor and power", "",
             "Seed-to-seed standard deviation of the final mIoU per arm (95% chi-square "
             "interval: with few seeds the spread itself is uncertain):", "",
             "| arm | seeds | std mIoU % | 95% interval |", "|---|---:|---:|---|"]
    for name, entry in summary["arms"].items():
        st = entry["stats"]["miou"]
        low, high = st["std_ci"]
        lines.append(f"| {name} | {len(entry['seeds'])} | {_fmt(st['std'])} | "
                     f"[{_fmt(low)}, {_fmt(high)}] |")
    lines.append("")
    if summary["aa_pairs"]:
        lines += ["Measured directly, the same-function (A/A) pairs: their true difference is "
                  "zero, so these gaps are the noise floor:", "",
                  "| pair | Δ mIoU % [95% CI] | std of Δ % | seeds |", "|---|---:|---:|---:|"]
        lines += [f"| {p['arms'][1]} − {p['arms'][0]} | {_interval(p, 'miou')} | "
                  f"{_fmt(p['std'])} | {p['n']} |" for p in summary["aa_pairs"]]
        lines.append("")
    for key, title in (("pooled", "all seed-paired differences (pooled)"),
                       ("aa", "the A/A pairs alone")):
        block = noise[key]
        if not block or not math.isfinite(block["sd"]):
            continue
        det = block["detectable"]
        lines += [f"From {title}: std of a paired Δ mIoU = {_fmt(block['sd'])} points "
                  f"({block['df']} degrees of freedom). With {noise['seeds']} seeds the "
                  f"smallest Δ mIoU a two-sided paired t-test detects with {power} power is "
                  f"{_fmt(det['single'])} points at α = {alpha:g}, and "
                  f"{_fmt(det['holm_first'])} at α/{noise['tests']} (Holm's first step over "
                  f"{noise['tests']} compared arm(s)).", ""]
        if block["seeds_needed"]:
            lines += [f"| Δ mIoU | seeds for {power} power at α = {alpha:g} | at α/"
                      f"{noise['tests']} |", "|---:|---:|---:|"]
            lines += [f"| {_fmt(row['delta'])} | {row['single']} | {row['holm_first']} |"
                      for row in block["seeds_needed"]]
            lines.append("")
    return lines


def _comparison_section(summary: dict) -> list[str]:
    lines = [f"## Paired difference to `{summary['baseline']}` (seed-paired, 95% CI)", "",
             "Each seed gives every arm the same data order and initial weights, so arms are "
             "compared seed by seed (Student t over seeds). p: two-sided paired t-test; Holm: "
             f"adjusted over the {len(summary['family'])} arm(s) whose function differs from "
             "the baseline's (A/A arms are not in that family). Detectable: the Δ this "
             f"comparison's own spread lets a test find with {100 * summary['power']:.0f}% power.",
             "", "| arm | Δ mIoU % | p | Holm p | detectable Δ | Δ pixel acc % | p | Holm p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in summary["arms"].items():
        if "vs_baseline" not in entry:
            continue
        m, a = entry["vs_baseline"]["miou"], entry["vs_baseline"]["pixel_acc"]
        tag = " (A/A)" if entry["aa"] else ""
        lines.append(f"| {name}{tag} | {_interval(m, 'miou')} | {_p(m['p_value'])} | "
                     f"{_p(m.get('p_holm'))} | {_fmt(m.get('detectable'))} | "
                     f"{_interval(a, 'pixel_acc')} | {_p(a['p_value'])} | "
                     f"{_p(a.get('p_holm'))} |")
    if not any("vs_baseline" in entry for entry in summary["arms"].values()):
        lines += ["", "No comparison yet: the baseline and another arm have no finished seed in "
                  "common."]
    return [*lines, ""]


def _per_image_section(summary: dict) -> list[str]:
    per_image = summary.get("per_image") or {"comparisons": {}, "missing": []}
    lines = ["## Per-image paired comparison (test-set noise)", "",
             "Secondary analysis: each validation image's difference to the baseline in "
             "per-image mIoU (over the classes present in that image) and pixel accuracy, "
             "averaged over the seeds both arms have, then the mean over images with a BCa "
             "bootstrap 95% interval resampling images. It captures test-set noise (another "
             "draw of images), not training noise (another seed): it is no substitute for "
             "the seed-paired comparison above.", ""]
    if per_image["comparisons"]:
        lines += ["| arm | images | seeds | Δ per-image mIoU % | Δ per-image pixel acc % |",
                  "|---|---:|---:|---:|---:|"]
        for arm, results in per_image["comparisons"].items():
            first = next(r for r in results.values() if r)
            cells = [_interval(r, metric) if r else "n/a" for metric, r in results.items()]
            lines.append(f"| {arm} | {first['images']} | {len(first['seeds'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if per_image["missing"]:
        lines += [f"{len(per_image['missing'])} finished run(s) have no `per_image.jsonl` and "
                  "are left out of this analysis: "
                  + ", ".join(f"{m['arm']} seed {m['seed']}" for m in per_image["missing"])
                  + ".", ""]
    return lines


def _throughput_section(summary: dict, meta: dict) -> list[str]:
    lines = ["## Training throughput", "",
             "images/s of the training steps (data loading excluded), from runs that had the "
             "machine alone (no other run of this experiment on the same host at the same "
             "time); where an arm has none, from shared runs, marked. "
             + meta.get("throughput_note", ""), "",
             "| arm | images/s | runs | measured | Δ vs baseline [95% CI] |",
             "|---|---:|---:|---|---:|"]
    for name, entry in summary["arms"].items():
        t = entry["throughput"]
        if not t["n"]:
            how = "no finished run"
        elif t["alone"]:
            how = "alone"
        elif t["timed"]:
            how = f"shared (up to {t['max_side_by_side']} side by side)"
        else:
            how = "unknown (no start/end times recorded)"
        diff = entry.get("vs_baseline", {}).get("images_per_s")
        delta = "" if diff is None else _interval(diff, "images_per_s") + (
            "" if diff["alone"] else " (shared)")
        lines.append(f"| {name} | {_fmt(t['mean'], 'images_per_s')} ± "
                     f"{_fmt(t['std'], 'images_per_s')} | {t['n']} | {how} | {delta} |")
    return [*lines, ""]


def _per_run_table(runs: Sequence[dict]) -> list[str]:
    lines = ["## Per run", "", "| arm | LR | seed | mIoU % | pixel acc % | images/s | side by "
             "side | device | load at start → end |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(runs, key=lambda r: (r["arm"], r["lr_scale"] or 0, r["seed"])):
        machine = r.get("machine") or {}
        device = machine.get("device", "?")
        if device == "cpu":
            device = f"{machine.get('cpu', 'cpu')}, {machine.get('threads')} thread(s)"
        load = (f"{machine['load_start']:.1f} → {machine['load_end']:.1f} "
                f"({machine.get('cpus')} CPUs)" if "load_start" in machine else "?")
        resumed = f" (resumed at {r['resumed_from']})" if r.get("resumed_from") else ""
        lines.append(f"| {r['arm']} | {_lr(r['lr_scale'])} | {r['seed']} | {_fmt(r['miou'])} | "
                     f"{_fmt(r['pixel_acc'])} | {_fmt(r['images_per_s'], 'images_per_s')}"
                     f"{resumed} | {r.get('side_by_side') or '?'} | {device} | {load} |")
    return [*lines, ""]


def markdown(summary: dict, meta: dict, runs: Sequence[dict], missing: Sequence[dict]) -> str:
    lines = _header(summary, meta, missing)
    if not runs:
        return "\n".join([*lines, "No run has finished yet.", ""])
    lines += _lr_section(summary, meta) + _arm_table(summary) + _same_function_section(summary)
    lines += _noise_section(summary) + _comparison_section(summary)
    lines += _per_image_section(summary) + _throughput_section(summary, meta)
    lines += _per_run_table(runs)
    lines += ["Curves: `report.png` (training loss and validation mIoU, mean over seeds of "
              "the chosen runs).", ""]
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], summary: dict, path: Path) -> Path:
    """Training loss and validation mIoU against iteration, one line per arm (seed mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, selection in summary["lr_selection"].items():
        arm_runs = [r for r in runs if r["arm"] == arm and r["lr_scale"] == selection["chosen"]]
        for axis, key, scale in ((axes[0], "loss_curve", 1), (axes[1], "miou_curve", 100)):
            curves = [r[key] for r in arm_runs if r[key]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [point[0] for point in curves[0][:length]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(length)]
            (line,) = axis.plot(steps, [scale * v for v in mean], label=arm)
            for curve in curves:  # individual seeds, faint
                axis.plot([p[0] for p in curve], [scale * p[1] for p in curve],
                          color=line.get_color(), alpha=0.2, linewidth=0.8)
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    axes[1].set(title="validation mIoU", xlabel="iteration", ylabel="mIoU %")
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, summary: dict, meta: dict, runs: Sequence[dict],
                 missing: Sequence[dict]) -> dict:
    """Write report.json / report.md / report.png; returns the JSON content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    content = {"meta": meta, **summary, "missing": list(missing), "runs": runs}
    text = json.dumps(_finite(content), indent=2, allow_nan=False)
    (out_dir / "report.json").write_text(text + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(summary, meta, runs, missing), encoding="utf-8")
    plot_curves(runs, summary, out_dir / "report.png")
    return content


def _finite(value):
    """NaN/inf -> None, tuples -> lists, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

