"""Per-image paired comparison of two arms: a secondary analysis of test-set noise.

Reads the ``per_image.jsonl`` records the final validation writes into each run folder (one
JSON object per validation image: ``image``, ``index``, ``labelled_pixels``,
``correct_pixels``, ``pixel_accuracy``, ``mean_iou``, ``mean_dice``, ``iou``, ``dice``). For an
arm and the baseline, every image's difference in a per-image metric is averaged over the
seeds both arms have, and the mean over images gets a BCa bootstrap interval that resamples
images. The interval says how much the comparison would move with another draw of test images
from the same distribution; it says nothing about training noise (seeds), which the seed-paired
analysis measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .evaluator import PER_IMAGE_FILE
from .logging import read_metrics
from .stats import bootstrap_mean_interval

PER_IMAGE_METRICS = ("mean_iou", "pixel_accuracy")
_REQUIRED = ("image", "index", "labelled_pixels", "correct_pixels", *PER_IMAGE_METRICS)


class PerImageError(ValueError):
    """A per_image.jsonl that is unreadable or breaks the record format."""


def read_per_image(path: Path) -> dict[str, dict]:
    """Image -> its record; every record checked against the format."""
    try:
        lines = read_metrics(path)
    except ValueError as err:  # a line that is not JSON, named by file and line
        raise PerImageError(str(err)) from None
    records: dict[str, dict] = {}
    for number, record in enumerate(lines, 1):
        where = f"{path}: record {number}"
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise PerImageError(f"{where} lacks {missing}")
        for key in PER_IMAGE_METRICS:
            value = record[key]
            if value is not None and not (isinstance(value, (int, float))
                                          and math.isfinite(value)):
                raise PerImageError(f"{where}: {key} must be a number or null, got {value!r}")
        if record["image"] in records:
            raise PerImageError(f"{where}: image {record['image']!r} appears twice")
        records[record["image"]] = record
    return records


def load_run_images(folders: Mapping[tuple[str, int], Path]
                    ) -> tuple[dict[tuple[str, int], dict], list[tuple[str, int]]]:
    """(arm, seed) -> per-image records for the runs that have the file; and those that lack it."""
    found, missing = {}, []
    for key, folder in folders.items():
        path = Path(folder) / PER_IMAGE_FILE
        if path.is_file():
            found[key] = read_per_image(path)
        else:
            missing.append(key)
    return found, missing


def paired_image_difference(arm_runs: Mapping[int, dict], baseline_runs: Mapping[int, dict],
                            metric: str, confidence: float = 0.95, resamples: int = 10_000
                            ) -> dict | None:
    """Mean over images of (arm − baseline) ``metric``, averaged over common seeds first.

    ``arm_runs``/``baseline_runs``: seed -> image -> record. Images whose metric is null in a
    run (nothing labelled or predicted) drop out of that seed. None when no seed is common.
    """
    seeds = sorted(set(arm_runs) & set(baseline_runs))
    if not seeds:
        return None
    per_image: dict[str, list[float]] = {}
    for seed in seeds:
        arm, base = arm_runs[seed], baseline_runs[seed]
        if set(arm) != set(base):
            only = sorted(set(arm) ^ set(base))[:3]
            raise PerImageError(f"seed {seed}: the two runs were evaluated on different images "
                                f"(e.g. {only}); compare runs of the same validation list")
        for image, record in arm.items():
            a, b = record[metric], base[image][metric]
            if a is not None and b is not None:
                per_image.setdefault(image, []).append(a - b)
    differences = [math.fsum(d) / len(d) for d in per_image.values()]
    if not differences:
        return None
    low, high = bootstrap_mean_interval(differences, confidence, resamples)
    return {"metric": metric, "seeds": seeds, "images": len(differences),
            "mean": math.fsum(differences) / len(differences), "ci_low": low, "ci_high": high}


def per_image_comparison(folders: Mapping[tuple[str, int], Path], arms: Sequence[str],
                         baseline: str, confidence: float = 0.95, resamples: int = 10_000
                         ) -> dict:
    """Every arm against ``baseline`` on each per-image metric, and the runs without records."""
    found, missing = load_run_images(folders)
    by_arm: dict[str, dict[int, dict]] = {}
    for (arm, seed), records in found.items():
        by_arm.setdefault(arm, {})[seed] = records
    comparisons = {}
    for arm in arms:
        if arm == baseline:
            continue
        results = {metric: paired_image_difference(by_arm.get(arm, {}),
                                                   by_arm.get(baseline, {}), metric,
                                                   confidence, resamples)
                   for metric in PER_IMAGE_METRICS}
        if any(results.values()):
            comparisons[arm] = results
    return {"comparisons": comparisons,
            "missing": [{"arm": arm, "seed": seed, "folder": str(folders[arm, seed])}
                        for arm, seed in missing]}
