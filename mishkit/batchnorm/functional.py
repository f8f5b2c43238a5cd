"""``batch_norm_act``: fused BatchNorm + activation, the kernel contract and the entry point.

Every backend provides four per-channel kernels over an ``(N, C, *)`` tensor, with per-channel
vectors (``mean``, ``scale``, ``shift``, ...) of shape ``(C,)`` in the compute dtype (float64 for
float64 inputs, float32 otherwise)::

    bn_act_stats(Tensor x) -> (Tensor mean, Tensor var)              # biased variance
    bn_act_forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, str name, float[] params)
        -> Tensor                                       # act((x - mean) * scale + shift)
    bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift,
        str name, float[] params) -> (Tensor sum_dz, Tensor sum_dz_xmu)
    bn_act_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift,
        Tensor coef_xmu, Tensor coef_const, str name, float[] params) -> Tensor
        # dz * scale + (x - mean) * coef_xmu + coef_const,  dz = grad_out * act'(z)

with ``scale = invstd * weight`` and ``shift = bias``, so ``z = x̂ γ + β`` is recomputed inside each
pass instead of being saved. The C++ extension registers them as ``torch.ops.mishkit.bn_act_*``,
Triton as ``torch.ops.mishkit.triton_bn_act_*``; the ``torch`` backend's are elementwise torch
ops (:mod:`mishkit.backends.reference`).

Backends and layouts: ``cpu`` (C++, at::vec; baseline, AVX2 or AVX-512 build), ``cuda`` and
``triton`` index NCHW-contiguous and channels-last tensors (``channels_last`` 4-D,
``channels_last_3d`` 5-D) directly and keep the layout in their outputs; strides of size-1 dims
never matter (a pooled ``(N, C, 1, 1)`` tensor is both); any other strides are copied once to
contiguous by :func:`batch_norm_act`. Half inputs compute in float32. The statistics are
single-pass (CUDA, Triton: Welford merges of shifted tiles) or two-pass (CPU); CUDA and Triton
combine per-block partial results per channel in a fixed order in float64, so their sums are
bitwise repeatable. ``torch`` accepts any layout.

:mod:`.autograd` composes them, shared by all backends (saving ``x`` and four ``(C,)`` vectors;
the cross-process reduction of :class:`SyncBatchNormAct2d` happens there, between kernel calls);
the residual form ``act(batch_norm(x) + r)`` reuses its pieces in :mod:`.residual`.
"""

from __future__ import annotations

import torch

from .. import backends, ops
from .._checks import check_input, dense_format, match_layout
from ..registry import get_spec
from . import lowering
from .autograd import BatchNormActFunction
from .output import BatchNormActOutputFunction, check_invertible, check_saves, saves_output
from .residual import BatchNormAddActFunction, check_residual


def batch_norm_act(x, running_mean, running_var, weight, bias, use_batch_stats: bool,
                   momentum: float, eps: float, name: str, params: tuple, backend: str = "auto",
                   process_group=None, residual: torch.Tensor | None = None,
                   saves: str = "input") -> torch.Tensor:
    """``act(batch_norm(x, ...) [+ residual])`` fused; arguments as ``F.batch_norm`` + activation.

    ``x`` is ``(N, C, *)``. Contiguous, channels_last and channels_last_3d tensors are used as
    they are; any other strides are copied once to contiguous. ``process_group`` (training
    only) all-reduces the statistics like ``torch.nn.SyncBatchNorm``. ``residual`` (x's shape,
    dtype and device, any strides) is added before the activation (:mod:`.residual`).
    ``saves="output"`` saves the output instead of the input for backward (:mod:`.output`).
    Under ``torch.compile``, ``backend="auto"`` runs the same computation as plain torch ops
    (:mod:`.lowering`), and what is saved is the compiler's choice, whatever ``saves`` says.
    """
    op = f"batch_norm_act({name})"
    check_input(x, op)
    if x.dim() < 2:
        raise ValueError(f"mishkit.{op}: expected an (N, C, ...) input, got shape {list(x.shape)}")
    channels = x.shape[1]
    for label, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                          ("running_var", running_var)):
        if tensor is not None and (tensor.shape != (channels,) or tensor.device != x.device):
            raise ValueError(
                f"mishkit.{op}: {label} must have shape ({channels},) on {x.device}, got "
                f"{list(tensor.shape)} on {tensor.device}"
            )
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError(f"mishkit.{op}: running statistics are required without batch stats")
    spec = get_spec(name)  # canonical name (the compiled kernels take no aliases)
    params = spec.bind(tuple(params), {})
    if check_saves(saves, f"mishkit.{op}") == "output":
        check_invertible(spec.name, params, f"mishkit.{op}")
    if ops.lowered(backend):
        if residual is not None:
            check_residual(residual, x, op)
        return lowering.batch_norm_act(x, running_mean, running_var, weight, bias,
                                       use_batch_stats, momentum, eps, spec.name, params,
                                       process_group, residual)
    chosen = backends.choose(backend, x.device, op)
    x = x.contiguous(memory_format=dense_format(x))
    if residual is not None:
        check_residual(residual, x, op)
    if saves == "output" and saves_output(x, weight, bias, residual, op):
        if residual is not None:
            residual = match_layout(residual, x)  # the kernels index both alike
        return BatchNormActOutputFunction.apply(x, residual, weight, bias, running_mean,
                                                running_var, use_batch_stats, momentum, eps,
                                                spec.name, params, chosen, process_group)
    if residual is not None:
        return BatchNormAddActFunction.apply(x, residual, weight, bias, running_mean, running_var,
                                             use_batch_stats, momentum, eps, spec.name, params,
                                             chosen, process_group)
    return BatchNormActFunction.apply(x, weight, bias, running_mean, running_var,
                                      use_batch_stats, momentum, eps, spec.name, params, chosen,
                                      process_group)
