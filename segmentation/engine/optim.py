"""Optimizer parameter groups (encoder/decoder learning rates, no decay on norms and biases)
and CSAIL's poly learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

# Normalization layers whose affine parameters get no weight decay. ``_NormBase`` covers every
# BatchNorm and SyncBatchNorm, and mishkit's BatchNormAct2d / SyncBatchNormAct2d.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: biases and normalization parameters go to ``no_decay``."""
    decay, no_decay = [], []
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(sub, NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def param_groups(model: nn.Module, lr_encoder: float, lr_decoder: float,
                 weight_decay: float) -> list[dict]:
    """Four groups: encoder/decoder × decayed/not, tagged ``name`` for logs and checks."""
    groups = []
    for part, lr in (("encoder", lr_encoder), ("decoder", lr_decoder)):
        decay, no_decay = split_decay(getattr(model, part))
        groups.append({"name": f"{part}", "params": decay, "lr": lr,
                       "weight_decay": weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr,
                       "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _sgd(groups, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr_encoder, momentum=cfg.beta1)


def _adamw(groups, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr_encoder, betas=(cfg.beta1, 0.999))


OPTIMIZERS: dict[str, Callable] = {"sgd": _sgd, "adamw": _adamw}


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """The optimizer named by ``TRAIN.optim`` over :func:`param_groups` of ``model``."""
    name = train_cfg.optim.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown TRAIN.optim {train_cfg.optim!r}; valid: {sorted(OPTIMIZERS)}")
    groups = param_groups(model, train_cfg.lr_encoder, train_cfg.lr_decoder,
                          train_cfg.weight_decay)
    return OPTIMIZERS[name](groups, train_cfg)


def poly_factor(iteration: int, max_iters: int, power: float) -> float:
    """CSAIL's ``(1 - iteration / max_iters) ** power``, 0 at and after ``max_iters``."""
    return max(0.0, 1.0 - iteration / max_iters) ** power


class PolyLR(LRScheduler):
    """``lr = base_lr * (1 - it / max_iters) ** power``, stepped once per iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9,
                 last_epoch: int = -1) -> None:
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        self.max_iters = int(max_iters)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = poly_factor(self.last_epoch, self.max_iters, self.power)
        return [base * factor for base in self.base_lrs]
