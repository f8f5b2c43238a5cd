"""``.odgt`` index files: one JSON object per line ``{fpath_img, fpath_segm, width, height}``.

Paths inside a record are relative to a *base directory*: for ADE20K that is the parent of
``ADEChallengeData2016``. Files ending in ``.gz`` are read and written gzip-compressed.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

log = logging.getLogger(__name__)

# key -> accepted python types (bool is an int subclass: rejected explicitly below)
_FIELDS: dict[str, type] = {"fpath_img": str, "fpath_segm": str, "width": int, "height": int}


@dataclass(frozen=True)
class Record:
    """One sample of an index file; ``source`` is ``"file.odgt:LINE"`` for error messages."""

    fpath_img: str
    fpath_segm: str
    width: int
    height: int
    source: str = ""

    @property
    def name(self) -> str:
        """Image file stem, e.g. ``ADE_val_00000001``."""
        return Path(self.fpath_img).stem

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _FIELDS})


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def parse_line(line: str, source: str) -> Record:
    """Parse one index line; raise :class:`DatasetError` naming ``source`` on any defect."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{source}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    values = {}
    for key, kind in _FIELDS.items():
        if key not in obj:
            raise DatasetError(f"{source}: missing key {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DatasetError(
                f"{source}: {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        if kind is int and value <= 0:
            raise DatasetError(f"{source}: {key!r} must be positive, got {value}")
        if kind is str and not value:
            raise DatasetError(f"{source}: {key!r} is empty")
        values[key] = value
    return Record(**values, source=source)


def read_odgt(path: str | Path, *, skip_bad: bool = False) -> list[Record]:
    """Read an index file (``.odgt`` or ``.odgt.gz``); blank lines are allowed.

    A malformed line raises :class:`DatasetError` naming ``file:line``; with ``skip_bad=True``
    it is logged (``logging.warning``) and left out instead. An empty index is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: index file not found")
    records = []
    with _open_text(path, "r") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_line(line, f"{path}:{number}"))
            except DatasetError as err:
                if not skip_bad:
                    raise
                log.warning("skipping bad index line: %s", err)
    if not records:
        raise DatasetError(f"{path}: index file has no records")
    return records


def write_odgt(path: str | Path, records) -> Path:
    """Write records (``Record`` or dicts with the four keys) one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "w") as handle:
        for rec in records:
            if isinstance(rec, dict):
                rec = parse_line(json.dumps(rec), str(path))
            handle.write(rec.to_json() + "\n")
    return path


def official_odgt(split: str) -> Path:
    """Path of the shipped official ADE20K index for ``"training"`` or ``"validation"``."""
    from .classes import resource_path

    splits = {"training": "training.odgt.gz", "validation": "validation.odgt.gz"}
    if split not in splits:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(splits)}")
    return Path(str(resource_path(splits[split])))
