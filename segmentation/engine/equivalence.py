"""Which experiment arms compute the same function: probed, not assumed from their names.

Two arms compute the same function when their networks, given the same weights, give the same
output. Fused BatchNorm+activation, an activation scope with nothing to convert, or a different
data order (``data_seed``) leave the function unchanged; but e.g. ``relu`` with ``fuse_bn``
routes MobileNetV2's ReLU6 through mishkit's ReLU and so changes it. Each arm's model is built
once (no pretrained weights), given the first arm's weights and randomised BatchNorm statistics,
and run in float64 on one fixed input: outputs that agree to a relative 1e-10 (float64 rounding
differs by ~1e-15 between fused and unfused BatchNorm; ReLU6 vs ReLU differs by ~1e-7 even at
random initialisation) mark the same function.
"""

from __future__ import annotations

import torch

from ..config import Config, arm_fuse_bn
from ..models import build_model
from .builders import model_kwargs

RELATIVE_TOLERANCE = 1e-10
_PROBE_SIZE = 64
_PROBE_SCALE = 10.0  # inputs well beyond ReLU6's clipping point


def _arm_model(cfg: Config, arm: dict) -> torch.nn.Module:
    kwargs = model_kwargs(cfg)
    kwargs.update(activation=arm["activation"], scope=arm.get("scope", "all"),
                  fuse_bn=arm_fuse_bn(arm), weights_encoder=None,
                  weights_decoder=None)
    torch.manual_seed(0)
    return build_model(**kwargs).to(torch.float64).eval()


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype))


@torch.no_grad()
def probe_outputs(cfg: Config, arms: list[dict]) -> dict[str, torch.Tensor]:
    """Each arm's float64 output on one probe batch, all models holding the same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few small forwards: threads only add contention
    try:
        reference = None
        outputs = {}
        probe = _PROBE_SCALE * torch.randn(1, 3, _PROBE_SIZE, _PROBE_SIZE, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(2))
        for arm in arms:
            model = _arm_model(cfg, arm)
            if reference is None:
                _randomise_batchnorm(model)
                reference = model.state_dict()
            else:
                model.load_state_dict(reference)  # conversion keeps the state_dict keys
            output = model(probe)
            outputs[arm["name"]] = getattr(output, "logits", output)
        return outputs
    finally:
        torch.set_num_threads(threads)


def same_function_groups(cfg: Config, arms: list[dict]) -> list[dict]:
    """Groups of two or more arms whose networks compute the same function.

    Each group: ``{"arms": [names], "max_relative_difference": float}`` (the largest output
    difference within the group, relative to the output's magnitude).
    """
    outputs = probe_outputs(cfg, arms)
    names = list(outputs)
    groups: list[list[str]] = []
    for name in names:
        for group in groups:
            if _relative_difference(outputs[group[0]], outputs[name]) <= RELATIVE_TOLERANCE:
                group.append(name)
                break
        else:
            groups.append([name])
    return [{"arms": group,
             "max_relative_difference": max(_relative_difference(outputs[group[0]], outputs[n])
                                            for n in group[1:])}
            for group in groups if len(group) > 1]


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale
