"""Loading CSAIL checkpoints and ImageNet encoder weights into our encoders and decoders."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

# Buffers of CSAIL's SynchronizedBatchNorm2d that its checkpoints carry next to BatchNorm's own:
# running sums it derives running_mean/running_var from. Those two are saved too, so these are
# redundant and dropped. (Its checkpoints also predate ``num_batches_tracked``, which
# BatchNorm's loader fills in for files without version metadata.)
SYNC_BN_BOOKKEEPING = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")


class CheckpointMismatchError(RuntimeError):
    """A weights file that cannot be read, or whose keys or shapes do not fit the module."""


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "ftp")


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, or of a URL (downloaded with a progress bar, cached)."""
    source = os.fspath(source)
    if _is_url(source):
        # CSAIL names every checkpoint encoder_epoch_N.pth: prefix the model folder to the
        # cached name so two models never share a cache entry.
        parts = Path(urlparse(source).path).parts
        file_name = "-".join(parts[-2:]) if len(parts) >= 2 else None
        state = torch.hub.load_state_dict_from_url(
            source, map_location="cpu", progress=True, file_name=file_name
        )
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"weights file not found: {source}")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, not a torch file, or pickled code
            raise CheckpointMismatchError(
                f"{source}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointMismatchError(f"{source} does not hold a state dict (got {type(state)})")
    return dict(state)


def normalize_state_dict(
    state: Mapping[str, torch.Tensor], head_prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Drop what is known not to belong to the module: a DataParallel ``module.`` prefix,
    CSAIL's SyncBN bookkeeping buffers and ImageNet classifier keys (``head_prefixes``)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    kept = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in SYNC_BN_BOOKKEEPING:
            continue
        if key.startswith(head_prefixes):
            log.info("dropping ImageNet classifier key %s", key)
            continue
        kept[key] = value
    return kept


def load_weights(
    module: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], name: str = "module"
) -> nn.Module:
    """Load a path, URL or state dict into ``module`` strictly (after normalize_state_dict).

    Raises CheckpointMismatchError listing missing, unexpected and mis-shaped keys.
    """
    state = source if isinstance(source, Mapping) else read_state_dict(source)
    origin = "state dict" if isinstance(source, Mapping) else os.fspath(source)
    state = normalize_state_dict(state, getattr(module, "imagenet_head_prefixes", ()))
    own = module.state_dict()
    for key in set(own) - set(state):
        if key.endswith(".num_batches_tracked"):  # absent from pre-2018 files: start at 0
            state[key] = torch.zeros_like(own[key])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(
            f"weights for {name} from {origin} do not match {type(module).__name__}:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mis_shaped)}): {mis_shaped}"
        )
    module.load_state_dict(state, strict=True)
    return module
