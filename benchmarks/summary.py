"""The markdown summary of one run (``summary.md``) and the short table printed last."""

from __future__ import annotations

from pathlib import Path

from .contenders import CPU_BUILDS

MIB = 2**20


def _fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def headline_log2(records: list[dict], preferred: int) -> int | None:
    sizes = {r["log2_numel"] for r in records if r.get("record") == "kernel"
             and r.get("status") == "ok"}
    if not sizes:
        return None
    return preferred if preferred in sizes else max(sizes)


def targets_table(targets: list[dict]) -> list[str]:
    return _table(["target", "measured", "threshold", "status"],
                  [[t["target"], _fmt(t["value"], ".3f"), f"{t['threshold']:.3g}", t["status"]]
                   for t in targets])


def render(records: list[dict], targets: list[dict], ours: str, preferred_log2: int) -> str:
    meta = next((r for r in records if r.get("record") == "meta"), {})
    end = next((r for r in records if r.get("record") == "end"), {})
    lines = [f"# mishkit benchmark: {meta.get('device', '?')}", "",
             f"- date {meta.get('date')}, commit `{meta.get('git_commit')}`",
             f"- torch {meta.get('torch')}, CUDA {meta.get('cuda')}, triton {meta.get('triton')}, "
             f"python {meta.get('python')}, torch threads {meta.get('torch_threads')}",
             f"- load average (1/5/15 min) at start {meta.get('load_average_start')}, "
             f"at end {end.get('load_average_end')}; wall time {_fmt(end.get('wall_s'), '.0f')} s",
             f"- \"ours\" = `{ours}` (what `backend=\"auto\"` picks on this device)",
             *_cpu_build_line(meta), "",
             "## Targets", "", *targets_table(targets), ""]
    log2 = headline_log2(records, preferred_log2)
    kernel = [r for r in records if r.get("record") == "kernel" and r.get("status") == "ok"]
    if log2 is not None:
        lines += [f"## Kernels at 2^{log2} elements, `{ours}`", "",
                  "Speed-up = baseline time / our time; % of copy = achieved GB/s over a "
                  "same-run device copy of the same bytes.", "",
                  *_kernel_table([r for r in kernel if r["log2_numel"] == log2
                                  and r["contender"] == ours]), "",
                  f"## Every contender for Mish at 2^{log2}", "",
                  *_kernel_table([r for r in kernel if r["log2_numel"] == log2
                                  and r["activation"] == "mish"], by_contender=True), ""]
    lines += (_cpu_build_section(kernel, ours, meta.get("cpu_capability"))
              + _bn_act_section(records) + _network_sections(records) + _compile_section(records)
              + _unavailable(records))
    for r in records:
        if r.get("record") == "suite_error":
            lines += [f"**Suite `{r['suite']}` stopped early**: {r['reason']}", ""]
    skipped = [r for r in records if r.get("record") == "skipped"]
    for r in skipped:
        lines += [f"**Skipped {len(r['cases'])} kernel case(s)**: {r['reason']}.", ""]
    return "\n".join(lines)


def _cpu_build_line(meta: dict) -> list[str]:
    if not meta.get("cpu_capability"):
        return []
    return [f"- CPU kernels: the `{meta['cpu_capability']}` build "
            f"({meta.get('cpu_capability_reason')})"]


def _kernel_table(rows: list[dict], by_contender: bool = False) -> list[str]:
    header = ["activation", "dtype", "mode", "ms (p20–p80)", "GB/s", "% of copy",
              "vs native", "vs naive", "vs compile", "vs relu", "saved MiB", "peak MiB"]
    if by_contender:
        header[0] = "contender"
    body = []
    for r in rows:
        s = r.get("speedup", {})
        body.append([r["contender"] if by_contender else r["activation"], r["dtype"], r["mode"],
                     f"{r['time_ms_median']:.4f} ({r['time_ms_p20']:.4f}–{r['time_ms_p80']:.4f})",
                     f"{r['gbps']:.1f}", f"{100 * r['copy_ratio']:.0f}%",
                     *(_fmt(s.get(b)) for b in ("native", "naive", "compile", "relu")),
                     _fmt(r.get("saved_bytes"), ".2f", MIB),
                     _fmt(r.get("peak_memory_bytes"), ".1f", MIB)])
    return _table(header, body)


def _cpu_build_section(kernel: list[dict], ours: str, active: str | None) -> list[str]:
    """Ours against each ISA build timed beside it: their time over ours, median of the rounds
    with its 95% confidence interval (ours' own build, timed again, shows the run's noise)."""
    builds = list(dict.fromkeys(r["contender"] for r in kernel if r["contender"] in CPU_BUILDS))
    rows = [r for r in kernel if r["contender"] == ours and any(b in r.get("speedup", {})
                                                                for b in builds)]
    if not rows:
        return []

    def cell(r, build):
        value, ci = r["speedup"].get(build), r.get("speedup_ci95", {}).get(build)
        return "–" if value is None else f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"

    body = [[r["activation"], r["dtype"], f"2^{r['log2_numel']}", r["mode"],
             f"{r['time_ms_median']:.4f}", *(cell(r, b) for b in builds)] for r in rows]
    return [f"## CPU ISA builds: `{ours}` (the `{active}` build) against each build", "",
            "Each build's time / ours, median of the side-by-side rounds (95% CI); above 1: "
            "ours is faster. Ours against its own build, timed again, is this run's noise.", "",
            *_table(["activation", "dtype", "size", "mode", "ours ms", *builds], body), ""]


def _bn_act_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("record") == "bn_act"]
    if not rows:
        return []
    body = [[r["activation"], r["dtype"], "×".join(map(str, r["shape"])), r["variant"],
             _fmt(r.get("time_ms_median"), ".3f"), _fmt(r.get("speedup_vs_bn_native")),
             _fmt(r.get("saved_bytes"), ".1f", MIB), _fmt(r.get("saved_ratio_vs_bn_native")),
             r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"]
            for r in rows]
    return ["## Fused BatchNorm + activation (forward+backward)", "",
            *_table(["activation", "dtype", "shape", "variant", "ms", "speed-up vs BN+native",
                     "saved MiB", "saved vs BN+native", "status"], body), ""]


def _network_sections(records: list[dict]) -> list[str]:
    lines = []
    for record, title in (("network", "Training step (forward + backward + SGD)"),
                          ("memory", "Saved-for-backward bytes, training forward")):
        rows = [r for r in records if r.get("record") == record]
        if not rows:
            continue
        body = [[r["variant"], f"{r['batch']}×3×{r['image_size']}²",
                 _fmt(r.get("images_per_s"), ".2f"), _fmt(r.get("peak_memory_bytes"), ".0f", MIB),
                 _fmt(r.get("saved_bytes"), ".1f", MIB), _fmt(r.get("saved_ratio_vs_relu")),
                 r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"]
                for r in rows]
        lines += [f"## {title}: {rows[0]['model']}", "",
                  *_table(["variant", "input", "images/s", "peak MiB", "saved MiB",
                           "saved vs ReLU", "status"], body), ""]
    return lines


def _compile_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("record") == "compile_network"]
    lines = []
    for network in dict.fromkeys(r["network"] for r in rows):
        same = [r for r in rows if r["network"] == network]
        body = [[r["variant"], f"{r['batch']}×3×{r['image_size']}²",
                 _fmt(r.get("saved_bytes"), ".2f", MIB), _fmt(r.get("time_ms_median"), ".1f"),
                 _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("time_ratio_vs_compile_native")),
                 _fmt(r.get("saved_ratio_vs_compile_native")),
                 _fmt(r.get("time_ratio_vs_eager_mishkit")), _fmt(r.get("cpu_ms_per_step"), ".1f"),
                 _fmt(r.get("first_step_s"), ".1f"),
                 _fmt(r.get("peak_memory_bytes"), ".0f", MIB),
                 r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"]
                for r in same]
        backend = next((r["compile_backend"] for r in same if r.get("compile_backend")), "?")
        lines += [f"## torch.compile ({backend}) vs eager, training forward+backward: "
                  f"{same[0]['model']}", "",
                  *_table(["variant", "input", "saved MiB", "ms", "images/s", "time vs compile "
                           "native", "saved vs compile native", "time vs eager mishkit",
                           "CPU ms/step", "first step s", "peak MiB", "status"], body), ""]
    return lines


def _unavailable(records: list[dict]) -> list[str]:
    reasons = {}
    for r in records:
        if r.get("record") == "kernel" and r.get("status") in ("unavailable", "error"):
            reasons.setdefault((r["contender"], r["status"], r.get("reason")), []).append(
                r["activation"])
    if not reasons:
        return []
    lines = ["## Contenders not measured", ""]
    for (name, status, reason), acts in reasons.items():
        lines.append(f"- `{name}` {status} for {', '.join(sorted(set(acts)))}: {reason}")
    return [*lines, ""]


def write_summary(out_dir: Path, text: str) -> Path:
    path = out_dir / "summary.md"
    path.write_text(text + "\n")
    return path
