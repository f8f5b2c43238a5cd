"""Run logs on rank 0: a JSON-lines metrics file, TensorBoard events when installed, tqdm bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("segmentation")


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, WARNING elsewhere, to stderr."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Appends one JSON object per record to ``path``; mirrors scalars to TensorBoard.

    ``start_step``: the iteration the run starts from (0, or a resumed checkpoint's). Records
    an earlier run left past it (it went on after that checkpoint, then died) are removed, and
    TensorBoard purges its events from there on, so every step is logged once. Inactive (every
    call a no-op) unless ``enabled`` (rank 0).
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = True,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(path)
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSON log is the record
                log.info("tensorboard is not installed; writing %s only", self.path)
            else:
                self._writer = SummaryWriter(str(self.path.parent / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)

    def _drop_records_after(self, step: int) -> None:
        """Keep the records up to ``step`` (all, for step 0: none), atomically."""
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when the process was killed
                    dropped += bool(line.strip())
                    continue
                if step and isinstance(record, dict) and record.get("step", step + 1) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if not dropped:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        where = f"after step {step}" if step else "of an earlier run (training starts afresh)"
        log.warning("%s: removed %d records %s", self.path, dropped, where)

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **{k: _json_safe(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Records of a JSON-lines log, optionally only those of one ``kind``."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> tqdm:
    """A tqdm bar (disabled off rank 0 or when asked), counting iterations."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                dynamic_ncols=True, leave=True)
