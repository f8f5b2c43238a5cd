"""build_encoder / build_decoder / build_model: name registries, weights, activation swap."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .common import init_decoder_weights, lookup
from .decoders import DECODERS, MULTI_SCALE
from .encoders import ENCODERS
from .model import SegmentationModel
from .weights import load_weights

# The seven ADE20K configurations of CSAIL's config/ folder: name → (encoder, decoder).
CSAIL_CONFIGS = {
    "mobilenetv2dilated-c1_deepsup": ("mobilenetv2dilated", "c1_deepsup"),
    "resnet18dilated-ppm_deepsup": ("resnet18dilated", "ppm_deepsup"),
    "resnet50dilated-ppm_deepsup": ("resnet50dilated", "ppm_deepsup"),
    "resnet101dilated-ppm_deepsup": ("resnet101dilated", "ppm_deepsup"),
    "resnet50-upernet": ("resnet50", "upernet"),
    "resnet101-upernet": ("resnet101", "upernet"),
    "hrnetv2-c1": ("hrnetv2", "c1"),
}

_IMAGENET_BASE = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/"
# CSAIL's ImageNet weights per encoder (pass weights_encoder="imagenet").
IMAGENET_WEIGHTS = {
    "mobilenetv2dilated": _IMAGENET_BASE + "mobilenet_v2.pth.tar",
    **{
        f"resnet{d}{suffix}": f"{_IMAGENET_BASE}resnet{d}-imagenet.pth"
        for d in (18, 50, 101)
        for suffix in ("", "dilated")
    },
    "hrnetv2": _IMAGENET_BASE + "hrnetv2_w48-imagenet.pth",
}

# Which module paths mishkit.convert may touch, per scope.
SCOPES: dict[str, list[str] | None] = {
    "all": None,
    "encoder": ["encoder", "encoder.*"],
    "decoder": ["decoder", "decoder.*"],
}

WeightsSource = str | os.PathLike | Mapping[str, torch.Tensor] | None


def build_encoder(arch: str, weights: WeightsSource = None) -> nn.Module:
    """An encoder from ENCODERS; ``weights``: path, URL, state dict or "imagenet"."""
    encoder = lookup(ENCODERS, arch, "encoder")()
    _load_encoder_weights(encoder, arch, weights)
    return encoder


def _load_encoder_weights(encoder: nn.Module, arch: str, weights: WeightsSource) -> None:
    if isinstance(weights, str) and weights.lower() == "imagenet":
        weights = IMAGENET_WEIGHTS[arch.lower()]
    if weights is not None:
        load_weights(encoder, weights, f"encoder {arch!r}")


def _default_in_channels(fc_dim: int) -> tuple[int, ...]:
    # CSAIL's convention: stage widths fc_dim/8, /4, /2, /1 (true of every ResNet).
    return (fc_dim // 8, fc_dim // 4, fc_dim // 2, fc_dim)


def build_decoder(
    arch: str,
    num_class: int = 150,
    fc_dim: int = 2048,
    in_channels: Sequence[int] | None = None,
    weights: WeightsSource = None,
) -> nn.Module:
    """A decoder from DECODERS for features whose last map has ``fc_dim`` channels.

    ``in_channels``: the width of every encoder feature map (default: CSAIL's fc_dim/8, /4,
    /2, /1); deep supervision reads ``in_channels[-2]``, UPerNet all of them.
    """
    factory = lookup(DECODERS, arch, "decoder")
    if not isinstance(num_class, int) or num_class < 1:
        raise ValueError(f"num_class must be a positive int, got {num_class!r}")
    in_channels = tuple(in_channels) if in_channels is not None else _default_in_channels(fc_dim)
    if in_channels[-1] != fc_dim:
        raise ValueError(
            f"fc_dim={fc_dim} but the last feature map has {in_channels[-1]} "
            f"channels (in_channels={in_channels})"
        )
    if arch.lower() in MULTI_SCALE and len(in_channels) < 2:
        raise ValueError(
            f"decoder {arch!r} needs at least two feature maps, the encoder "
            f"gives {len(in_channels)} ({in_channels}); use c1 or ppm"
        )
    decoder = factory(num_class, in_channels)
    init_decoder_weights(decoder)
    if weights is not None:
        load_weights(decoder, weights, f"decoder {arch!r}")
    return decoder


def _convert_activations(model: SegmentationModel, activation: str, scope: str,
                         fuse_bn: bool | str):
    include = lookup(SCOPES, scope, "scope")
    if isinstance(activation, str) and activation.strip().lower() == "relu" and not fuse_bn:
        return None  # the models are built with their reference activations already
    try:
        import mishkit
    except ImportError as error:  # pragma: no cover - mishkit ships with this package
        raise ImportError(f"activation={activation!r} / fuse_bn needs mishkit.convert") from error
    _, report = mishkit.convert(model, activation, include=include, fuse_bn=fuse_bn, report=True)
    return report


def build_model(
    encoder: str,
    decoder: str,
    num_class: int = 150,
    fc_dim: int | None = None,
    activation: str = "relu",
    scope: str = "all",
    fuse_bn: bool | str = False,
    sync_bn: bool = False,
    weights_encoder: WeightsSource = None,
    weights_decoder: WeightsSource = None,
) -> SegmentationModel:
    """Encoder + decoder as a SegmentationModel (see its docstring for the outputs).

    ``activation`` other than "relu" (the reference: ReLU, and ReLU6 inside MobileNetV2), or
    ``fuse_bn``, goes through ``mishkit.convert`` on ``scope`` ("all", "encoder" or
    "decoder"); its report is kept as ``model.conversion_report``. ``sync_bn`` turns every
    BatchNorm into SyncBatchNorm first. Weights (path, URL, state dict; "imagenet" for the
    encoder) are loaded last and strictly, so they prove the converted model keeps the keys.
    ``fuse_bn="output"`` fuses saving only the outputs (``BatchNormAct2d(saves="output")``).
    """
    enc = lookup(ENCODERS, encoder, "encoder")()
    lookup(DECODERS, decoder, "decoder")
    out_channels = enc.out_channels
    if fc_dim is not None and fc_dim != out_channels[-1]:
        raise ValueError(
            f"fc_dim={fc_dim} does not match encoder {encoder!r}, whose output "
            f"has {out_channels[-1]} channels (leave fc_dim=None)"
        )
    dec = build_decoder(decoder, num_class, out_channels[-1], in_channels=out_channels)
    model = SegmentationModel(enc, dec, encoder.lower(), decoder.lower())
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.conversion_report = _convert_activations(model, activation, scope, fuse_bn)
    _load_encoder_weights(model.encoder, encoder, weights_encoder)
    if weights_decoder is not None:
        load_weights(model.decoder, weights_decoder, f"decoder {decoder!r}")
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
