"""Saved-activation accounting: how many bytes one forward keeps alive for backward.

Counts every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``), deduplicated by
storage, so an in-place ReLU whose output shares the BatchNorm output's storage counts once.
Parameters and buffers are reported apart: they live regardless of the activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .conversion import convert


@dataclass
class SavedBytes:
    """Result of :func:`saved_tensor_bytes`."""

    total: int  # activation bytes saved for backward (parameters and buffers excluded)
    parameter_bytes: int  # parameter / buffer storages autograd also saved
    tensors: int  # distinct activation storages
    per_module: dict[str, int] = field(default_factory=dict)  # innermost module path -> bytes

    def __str__(self) -> str:
        rows = [f"  {path or '<root>'}: {_mib(n)}" for path, n in self.per_module.items()]
        head = f"saved for backward: {_mib(self.total)} in {self.tensors} tensors"
        return "\n".join([head, *rows])


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
        return ("tensor", id(t)), t.numel() * t.element_size()
    return (str(t.device), storage.data_ptr()), storage.nbytes()


def saved_tensor_bytes(fn_or_model: Callable, *inputs, **kwargs) -> SavedBytes:
    """Bytes saved for backward by one forward ``fn_or_model(*inputs, **kwargs)``.

    Runs with grad enabled; the module keeps its train/eval mode. For a module, ``per_module``
    attributes each storage to the innermost submodule running when it was first saved.
    """
    if not callable(fn_or_model):
        raise TypeError(f"saved_tensor_bytes: expected a module or function, got {fn_or_model!r}")
    model = fn_or_model if isinstance(fn_or_model, nn.Module) else None
    owned = set()
    if model is not None:
        owned = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}
    stack, handles = [""], []

    def leave(module, args, output) -> None:  # a forward hook's return value would replace output
        stack.pop()

    if model is not None:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda m, args, path=path: stack.append(path)))
            handles.append(module.register_forward_hook(leave))
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in seen:
            owned_tensor = isinstance(t, nn.Parameter) or key in owned
            seen[key] = (nbytes, stack[-1], owned_tensor)
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = fn_or_model(*inputs, **kwargs)
        del output  # frees the graph and the saved tensors
    finally:
        for handle in handles:
            handle.remove()
    per_module: dict[str, int] = {}
    total = parameter_bytes = count = 0
    for nbytes, path, owned_tensor in seen.values():
        if owned_tensor:
            parameter_bytes += nbytes
            continue
        total += nbytes
        count += 1
        per_module[path] = per_module.get(path, 0) + nbytes
    return SavedBytes(total, parameter_bytes, count, per_module)


# -- comparing variants of one model ---------------------------------------------------------------


@dataclass(frozen=True)
class VariantRow:
    name: str
    saved_bytes: int
    ratio: float  # saved_bytes / the first variant's


def compare_variants(build: Callable[[], nn.Module],
                     variants: Mapping[str, Callable[[nn.Module], nn.Module]],
                     *inputs) -> list[VariantRow]:
    """Saved bytes of ``variant(build())(*inputs)`` for each variant; ratios to the first one.

    ``build`` makes a fresh model each time (in the mode to measure, e.g. training).
    """
    if not variants:
        raise ValueError("compare_variants: no variants given")
    rows, baseline = [], None
    for name, make in variants.items():
        result = saved_tensor_bytes(make(build()), *inputs)
        baseline = result.total if baseline is None else baseline
        ratio = result.total / baseline if baseline else math.nan
        rows.append(VariantRow(name, result.total, ratio))
    return rows


def format_rows(rows: list[VariantRow]) -> str:
    width = max(len(row.name) for row in rows)
    return "\n".join(f"{row.name:<{width}}  {_mib(row.saved_bytes):>12}  x{row.ratio:.3f}"
                     for row in rows)


class NaiveMish(nn.Module):
    """``x * tanh(softplus(x))`` as three autograd ops: what a Mish without a fused op costs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(nn.functional.softplus(x))


def conv_bn_act_stack(activation: Callable[[], nn.Module], widths=(32, 64, 128, 256),
                      blocks_per_stage: int = 2, in_channels: int = 3) -> nn.Sequential:
    """Conv-BN-act blocks in stages (stride 2 between), standing in for a segmentation encoder."""
    layers, channels = [], in_channels
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if block == 0 and stage > 0 else 1
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False),
                       nn.BatchNorm2d(width), activation()]
            channels = width
    return nn.Sequential(*layers)


def mish_variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Ways to run Mish, applied to a model built with ``nn.ReLU(inplace=True)``: the ReLU
    baseline itself, torch's nn.Mish, the naive formula, mishkit's Mish, and mishkit's Mish with
    fused BatchNorm saving its input (``fuse_bn=True``) or only its output (``"output"``)."""

    def replace_by(factory):
        def make(model):
            for module in list(model.modules()):
                for slot, child in list(module.named_children()):
                    if isinstance(child, nn.ReLU):
                        setattr(module, slot, factory())
            return model
        return make

    return {
        "relu_inplace": lambda model: model,
        "torch_mish": replace_by(nn.Mish),
        "naive_mish": replace_by(NaiveMish),
        "mishkit_mish": lambda model: convert(model, "mish"),
        "mishkit_mish_fuse_bn": lambda model: convert(model, "mish", fuse_bn=True),
        "mishkit_mish_fuse_bn_output": lambda model: convert(model, "mish", fuse_bn="output"),
    }
