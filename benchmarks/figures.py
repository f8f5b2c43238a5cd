"""PNG plots of one run: bandwidth vs size per contender, speed-up bars, memory bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from .kernel import MODES

MIB = 2**20


def write_figures(records: list[dict], out_dir: Path, ours: str, headline_log2: int | None,
                  ) -> list[Path]:
    kernel = [r for r in records if r.get("record") == "kernel" and r.get("status") == "ok"]
    copies = [r for r in records if r.get("record") == "copy"]
    paths = [_bandwidth(kernel, copies, activation, out_dir)
             for activation in dict.fromkeys(r["activation"] for r in kernel)]
    if headline_log2 is not None:
        paths.append(_speedups(kernel, ours, headline_log2, out_dir))
    memory = _memory(kernel, records, headline_log2, out_dir)
    return [p for p in [*paths, memory] if p is not None]


def _bandwidth(kernel, copies, activation, out_dir: Path) -> Path:
    rows = [r for r in kernel if r["activation"] == activation]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(4.2 * len(MODES), 3.2 * len(dtypes)),
                             squeeze=False, sharex=True)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            for contender in dict.fromkeys(r["contender"] for r in rows):
                points = sorted((r["log2_numel"], r["gbps"]) for r in rows if r["dtype"] == dtype
                                and r["mode"] == mode and r["contender"] == contender)
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=contender)
            # CPU copies are timed with each case (record "activation"), GPU ones once
            copy = sorted((r["log2_numel"], r["gbps"]) for r in copies if r["dtype"] == dtype
                          and r.get("activation", activation) == activation)
            if copy:
                ax.plot(*zip(*copy), "k--", linewidth=1, label="device copy")
            ax.set_title(f"{activation} {dtype} {mode}", fontsize=9)
            ax.set_xlabel("log2(elements)")
            ax.set_ylabel("GB/s (log scale)")
            ax.set_yscale("log")  # contenders span orders of magnitude at small sizes
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"bandwidth_{activation}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _speedups(kernel, ours, log2, out_dir: Path) -> Path:
    rows = [r for r in kernel if r["contender"] == ours and r["log2_numel"] == log2]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows)) or ["fp32"]
    baselines = ("native", "naive", "compile")
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(11, 3.2 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        subset = [r for r in rows if r["dtype"] == dtype and r["mode"] == "forward+backward"]
        width = 0.8 / len(baselines)
        for k, baseline in enumerate(baselines):
            xs = [i + k * width for i, r in enumerate(subset) if baseline in r["speedup"]]
            ys = [r["speedup"][baseline] for r in subset if baseline in r["speedup"]]
            ax.bar(xs, ys, width, label=f"vs {baseline}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(subset))])
        ax.set_xticklabels([r["activation"] for r in subset], rotation=30, fontsize=8)
        ax.set_ylabel("speed-up (×)")
        ax.set_title(f"{ours} forward+backward speed-up, {dtype}, 2^{log2} elements", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "speedup.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _memory(kernel, records, log2, out_dir: Path) -> Path | None:
    panels = []
    mish = {r["contender"]: r for r in kernel if r["activation"] == "mish"
            and r["log2_numel"] == log2 and r["mode"] == "forward+backward"
            and r["dtype"] == "fp32" and r.get("saved_bytes") is not None}
    if mish:
        panels.append((f"Mish fp32 2^{log2}: saved bytes", list(mish),
                       [r["saved_bytes"] / MIB for r in mish.values()]))
        peaks = {k: r["peak_memory_bytes"] for k, r in mish.items() if r.get("peak_memory_bytes")}
        if peaks:
            panels.append(("Mish fp32 fwd+bwd: peak memory", list(peaks),
                           [v / MIB for v in peaks.values()]))
    bn = [r for r in records if r.get("record") == "bn_act" and r.get("status") == "ok"
          and r["activation"] == "mish" and r["dtype"] == "fp32"]
    if bn:
        panels.append(("BN+Mish fp32: saved bytes", [r["variant"] for r in bn],
                       [r["saved_bytes"] / MIB for r in bn]))
    memory = [r for r in records if r.get("record") == "memory" and r.get("status") == "ok"]
    if memory:
        panels.append((f"{memory[0]['model'][:40]}: saved bytes", [r["variant"] for r in memory],
                       [r["saved_bytes"] / MIB for r in memory]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, labels, values) in zip(axes[0], panels):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / "memory.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
