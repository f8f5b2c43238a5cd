"""Build datasets, samplers and models from a config (shared by train, eval, infer, experiment)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Sampler

from ..config import Config
from ..data import AspectRatioBatchSampler, TrainDataset, ValDataset
from ..data.synthetic import make_synthetic_dataset
from ..models import build_model
from .distributed import DistContext, barrier
from .sync_bn import convert_to_gloo_sync_bn, use_sync_bn

log = logging.getLogger(__name__)

_SYNTHETIC_MARKER = "synthetic.json"


def _synthetic_params(cfg: Config) -> dict:
    syn = cfg.DATASET.synthetic
    return {"train": syn.train, "val": syn.val, "size": syn.size, "seed": syn.seed}


def prepare_dataset(cfg: Config, ctx: DistContext) -> None:
    """Generate the synthetic dataset when the config asks for it and it is missing.

    The data go to the folder of ``DATASET.list_train`` (rank 0 writes, the others wait). An
    existing folder generated with other parameters is an error rather than silently reused.
    """
    if not cfg.DATASET.synthetic.enabled:
        return
    folder = Path(cfg.DATASET.list_train).parent
    if Path(cfg.DATASET.list_val).parent != folder:
        raise ValueError("a synthetic dataset needs DATASET.list_train and list_val in one "
                         f"folder, got {cfg.DATASET.list_train} and {cfg.DATASET.list_val}")
    params = _synthetic_params(cfg)
    marker = folder / _SYNTHETIC_MARKER
    if ctx.is_main:
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found != params:
                raise ValueError(f"{folder} holds a synthetic dataset made with {found}, but the "
                                 f"config asks for {params}: delete the folder or change "
                                 "DATASET.list_train/list_val")
        else:
            log.info("generating the synthetic dataset %s in %s", params, folder)
            written = make_synthetic_dataset(folder, **params)
            expected = {"training": Path(cfg.DATASET.list_train),
                        "validation": Path(cfg.DATASET.list_val)}
            for split, path in expected.items():
                if written[split].resolve() != path.resolve():
                    raise ValueError(f"the synthetic generator writes {written[split]}, but the "
                                     f"config lists {path}: name it {written[split].name}")
            marker.write_text(json.dumps(params), encoding="utf-8")
    barrier()


def _root(cfg: Config) -> str | None:
    return cfg.DATASET.root_dataset or None


def build_train_dataset(cfg: Config) -> TrainDataset:
    d = cfg.DATASET
    return TrainDataset(d.list_train, _root(cfg), img_max_size=d.imgMaxSize,
                        padding_constant=d.padding_constant,
                        segm_downsampling_rate=d.segm_downsampling_rate,
                        num_classes=d.num_class, skip_bad=d.skip_bad)


def build_val_dataset(cfg: Config, img_sizes: Sequence[int]) -> ValDataset:
    d = cfg.DATASET
    return ValDataset(d.list_val, _root(cfg), img_sizes=img_sizes, img_max_size=cfg.VAL.imgMaxSize,
                      padding_constant=d.padding_constant, num_classes=d.num_class,
                      skip_bad=d.skip_bad)


def build_train_sampler(cfg: Config, dataset: TrainDataset, ctx: DistContext
                        ) -> AspectRatioBatchSampler:
    """The batch sampler: its draws depend on ``TRAIN.seed`` only (never on the model)."""
    return AspectRatioBatchSampler(
        dataset.sizes, cfg.TRAIN.batch_size_per_gpu, cfg.DATASET.imgSizes,
        flip=cfg.DATASET.random_flip, shuffle=cfg.TRAIN.shuffle, drop_last=True,
        seed=cfg.TRAIN.seed, num_replicas=ctx.world_size, rank=ctx.rank)


class ResumableBatchSampler(Sampler):
    """Passes ``sampler``'s batches through, skipping the first ``skip`` of the next pass.

    Lets a resumed run continue mid-pass without loading the images it already trained on.
    """

    def __init__(self, sampler: AspectRatioBatchSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        for position, batch in enumerate(self.sampler):
            if position >= skip:
                yield batch


def model_kwargs(cfg: Config) -> dict:
    m = cfg.MODEL
    return {
        "encoder": m.arch_encoder,
        "decoder": m.arch_decoder,
        "num_class": cfg.DATASET.num_class,
        "fc_dim": m.fc_dim,
        "activation": m.activation,
        "scope": m.activation_scope,
        "fuse_bn": m.fuse_bn,
        "weights_encoder": m.weights_encoder or None,
        "weights_decoder": m.weights_decoder or None,
    }


def build_segmentation_model(cfg: Config, ctx: DistContext, *, pretrained: bool = True
                             ) -> nn.Module:
    """The configured model on ``ctx.device``; SyncBN when ``TRAIN.sync_bn`` says so.

    ``pretrained=False`` skips ``MODEL.weights_*`` (when a checkpoint is loaded next anyway).
    """
    kwargs = model_kwargs(cfg)
    if not pretrained:
        kwargs.update(weights_encoder=None, weights_decoder=None)
    sync = use_sync_bn(cfg.TRAIN.sync_bn, ctx.world_size)
    model = build_model(**kwargs, sync_bn=sync)
    if sync and ctx.device.type == "cpu":
        model = convert_to_gloo_sync_bn(model)  # torch's SyncBatchNorm is GPU-only
    return model.to(ctx.device)


def freeze_batchnorm(model: nn.Module) -> None:
    """``TRAIN.fix_bn``: BN layers in eval mode (running stats) with frozen affine parameters."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)


def autocast_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
