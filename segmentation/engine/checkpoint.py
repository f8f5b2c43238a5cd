"""Full training-state checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint holds the model, optimizer, LR scheduler and grad-scaler states, the epoch and
iteration, the RNG states (torch CPU, CUDA, numpy, Python) and the config, so that resuming
continues the run exactly. Everything is stored as tensors and plain Python containers, which
``torch.load(weights_only=True)`` accepts: no pickled code is ever executed on load.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_VERSION = 1
_REQUIRED = ("version", "model", "optimizer", "scheduler", "epoch", "iteration", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable or lacks part of the training state."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill mid-write leaves the previous file at ``path`` untouched (rename is atomic
    on POSIX within one filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a training state (see :data:`_REQUIRED` for its keys) atomically."""
    missing = [k for k in _REQUIRED if k not in state and k != "version"]
    if missing:
        raise CheckpointError(f"checkpoint state for {path} lacks {missing}")
    return atomic_save({"version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, not a torch file, disallowed pickle content
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a full training checkpoint (missing {missing})")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state['version']}, expected {CHECKPOINT_VERSION}"
        )
    return state


def model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a training checkpoint, or of a bare state-dict file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds neither a training checkpoint nor a state dict")
    return state
