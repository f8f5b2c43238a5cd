"""The experiment's statistics: LR selection, per-arm noise, seed-paired tests with Holm's
correction, power, A/A pairs, and throughput only where it was measured fairly.

Input: the result records of the finished runs (``runs.train_run``), the arms, and what the
other analyses found (same-function groups, the per-image comparison). Output: one summary dict
that ``report.markdown`` renders and ``report.json`` stores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from . import stats

TESTED = ("miou", "pixel_acc")  # seed-paired tests, Holm-corrected across arms
METRICS = (*TESTED, "images_per_s")


def select_learning_rates(records: Sequence[dict], arms: Sequence[str]) -> dict[str, dict]:
    """Per arm: each LR multiplier's validation mIoU over seeds, and the one chosen (best
    mean). Without an LR grid every record has ``lr_scale`` None and that is the choice."""
    selection = {}
    for arm in arms:
        grid: dict = {}
        for record in records:
            if record["arm"] == arm:
                grid.setdefault(record["lr_scale"], []).append(record["miou"])
        table = {scale: dict(zip(("mean", "std"), stats.mean_std(values)), n=len(values))
                 for scale, values in grid.items()}
        chosen = max(table, key=lambda s: table[s]["mean"]) if table else None
        selection[arm] = {"grid": [{"lr_scale": s, **v} for s, v in sorted(
            table.items(), key=lambda item: -1 if item[0] is None else item[0])],
            "chosen": chosen}
    return selection


def side_by_side(records: Sequence[dict]) -> list[int | None]:
    """For each record: the most runs of the experiment (itself included) that trained on its
    host at one moment while it trained; None where a record lacks the timing."""
    spans = [(r.get("machine") or {}) for r in records]
    timed = [m for m in spans if "started_at" in m]
    counts: list[int | None] = []
    for mine in spans:
        if "started_at" not in mine:
            counts.append(None)
            continue
        same_host = [m for m in timed if m["host"] == mine["host"]]
        # The concurrency peaks at some run's start: try its own and the later ones in its span.
        moments = [mine["started_at"]] + [m["started_at"] for m in same_host
                                          if mine["started_at"] < m["started_at"]
                                          < mine["finished_at"]]
        counts.append(max(sum(1 for m in same_host if m["started_at"] <= t < m["finished_at"])
                          for t in moments))
    return counts


def _pooled_sd(entries: Sequence[dict]) -> tuple[float, int]:
    """Pooled standard deviation of several samples' sd (weights: degrees of freedom)."""
    usable = [(e["std"], e["n"] - 1) for e in entries if e["n"] >= 2 and math.isfinite(e["std"])]
    df = sum(d for _, d in usable)
    if not df:
        return math.nan, 0
    return math.sqrt(sum(d * sd * sd for sd, d in usable) / df), df


def _same_function(groups: Sequence[Mapping], a: str, b: str) -> bool:
    return any(a in g["arms"] and b in g["arms"] for g in groups)


def analyse(records: Sequence[dict], arm_specs: Sequence[dict], baseline: str, *,
            alpha: float = 0.05, power: float = 0.8, deltas: Sequence[float] = (),
            same_function: Sequence[Mapping] = (), per_image: Mapping | None = None) -> dict:
    arms = [a["name"] for a in arm_specs]
    sharing = side_by_side(records)
    for record, count in zip(records, sharing):
        record["side_by_side"] = count
    lr = select_learning_rates(records, arms)
    chosen = {arm: {r["seed"]: r for r in records
                    if r["arm"] == arm and r["lr_scale"] == lr[arm]["chosen"]} for arm in arms}
    seeds = sorted({r["seed"] for r in records})
    summary: dict = {"baseline": baseline, "seeds": seeds, "alpha": alpha, "power": power,
                     "lr_selection": lr, "same_function": list(same_function), "arms": {}}
    for spec in arm_specs:
        runs = chosen[spec["name"]]
        per_seed = {m: [runs[s][m] for s in seeds if s in runs] for m in TESTED}
        entry = {"spec": dict(spec), "seeds": [s for s in seeds if s in runs],
                 "per_seed": per_seed,
                 "stats": {m: dict(zip(("mean", "std"), stats.mean_std(v)))
                           for m, v in per_seed.items()},
                 "throughput": _throughput(runs.values())}
        std = entry["stats"]["miou"]["std"]
        entry["stats"]["miou"]["std_ci"] = stats.std_interval(std, len(per_seed["miou"]))
        summary["arms"][spec["name"]] = entry
    _compare_to_baseline(summary, chosen, baseline, same_function)
    summary["aa_pairs"] = _aa_pairs(chosen, same_function)
    summary["noise"] = _noise_and_power(summary, alpha, power, deltas)
    summary["per_image"] = per_image
    return summary


def _throughput(runs) -> dict:
    runs = list(runs)
    """images/s over the runs that had the machine alone, else over the shared ones (marked)."""
    alone = [r["images_per_s"] for r in runs if r.get("side_by_side") == 1]
    shared = [r for r in runs if r.get("side_by_side") != 1]
    values = alone or [r["images_per_s"] for r in shared]
    mean, std = stats.mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "alone": bool(alone),
            "timed": any(r.get("side_by_side") is not None for r in runs),
            "max_side_by_side": max((r.get("side_by_side") or 0 for r in shared), default=0)}


def _compare_to_baseline(summary: dict, chosen: dict, baseline: str,
                         same_function: Sequence[Mapping]) -> None:
    base = chosen.get(baseline, {})
    family = []
    for name, entry in summary["arms"].items():
        runs = chosen[name]
        common = [s for s in summary["seeds"] if s in runs and s in base]
        if name == baseline or not common:
            continue
        entry["aa"] = _same_function(same_function, name, baseline)
        entry["vs_baseline"] = {
            m: stats.paired_difference([runs[s][m] for s in common], [base[s][m] for s in common])
            for m in TESTED}
        fair = [s for s in common
                if runs[s].get("side_by_side") == 1 and base[s].get("side_by_side") == 1]
        used = fair or common
        entry["vs_baseline"]["images_per_s"] = {
            **stats.paired_difference([runs[s]["images_per_s"] for s in used],
                                      [base[s]["images_per_s"] for s in used]),
            "alone": bool(fair)}
        if not entry["aa"]:
            family.append(name)
    for metric in TESTED:  # Holm across the arms that differ from the baseline's function
        adjusted = stats.holm([summary["arms"][n]["vs_baseline"][metric]["p_value"]
                               for n in family])
        for name, p in zip(family, adjusted):
            summary["arms"][name]["vs_baseline"][metric]["p_holm"] = p
    summary["family"] = family


def _aa_pairs(chosen: dict, same_function: Sequence[Mapping]) -> list[dict]:
    """Seed-paired mIoU differences within every same-function group: pure noise."""
    pairs = []
    for group in same_function:
        names = [n for n in group["arms"] if n in chosen]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = sorted(set(chosen[a]) & set(chosen[b]))
                if common:
                    diff = stats.paired_difference([chosen[b][s]["miou"] for s in common],
                                                   [chosen[a][s]["miou"] for s in common])
                    pairs.append({"arms": [a, b], **diff})
    return pairs


def _noise_and_power(summary: dict, alpha: float, power: float,
                     deltas: Sequence[float]) -> dict:
    comparisons = [e["vs_baseline"]["miou"] for e in summary["arms"].values()
                   if "vs_baseline" in e]
    baseline = summary["baseline"]
    others = [p for p in summary["aa_pairs"] if baseline not in p["arms"]]  # not counted twice
    sd_all, df_all = _pooled_sd(comparisons + others)
    sd_aa, df_aa = _pooled_sd(summary["aa_pairs"])
    n = max((c["n"] for c in comparisons), default=len(summary["seeds"]))
    tests = max(len(summary["family"]), 1)
    for entry in summary["arms"].values():
        if "vs_baseline" in entry:
            d = entry["vs_baseline"]["miou"]
            d["detectable"] = stats.detectable_difference(d["std"], d["n"], alpha, power)
    levels = {"single": alpha, "holm_first": alpha / tests}

    def plan(sd: float) -> dict:
        return {
            "detectable": {k: stats.detectable_difference(sd, n, a, power)
                           for k, a in levels.items()},
            "seeds_needed": [{"delta": delta, **{k: stats.seeds_needed(delta, sd, a, power)
                                                 for k, a in levels.items()}}
                             for delta in deltas],
        }

    return {"seeds": n, "tests": tests, "levels": levels,
            "pooled": {"sd": sd_all, "df": df_all, **plan(sd_all)},
            "aa": {"sd": sd_aa, "df": df_aa, **plan(sd_aa)} if df_aa else None}
