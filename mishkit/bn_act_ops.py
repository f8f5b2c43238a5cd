"""Fused BatchNorm + activation: the kernel ops, the shared autograd and the pure-torch reference.

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
Triton as ``torch.ops.mishkit.triton_bn_act_*``; the ``torch`` backend is the reference below.

Backends and layouts: ``cpu`` (C++, at::vec, AVX2 or baseline build), ``cuda`` and ``triton`` index
NCHW-contiguous and channels_last tensors directly (outputs keep the layout); any other strides
are copied once to contiguous by :func:`batch_norm_act`. Half inputs compute in float32; sums are
carried in double across planes / blocks (CPU, CUDA) or in the compute dtype per channel tile
(Triton). CUDA combines blocks with double atomics, so its sums are not bitwise deterministic.
``torch`` is elementwise torch ops over the registry formulas (any layout, not fused).

:class:`BatchNormActFunction` composes them, shared by all backends: the cross-process reduction of
:class:`~mishkit.bn_act.SyncBatchNormAct2d` happens here in Python, between kernel calls. It saves
``x`` and four ``(C,)`` vectors only. Double backward is not supported (raises). The residual
form ``act(batch_norm(x) + r)`` reuses these pieces in :mod:`mishkit.bn_add_act`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import backends
from .registry import get_spec

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class BnActKernels(NamedTuple):
    """One backend's four kernels (signatures in the module docstring)."""

    stats: Callable
    forward: Callable
    backward_reduce: Callable
    backward_elemt: Callable


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- pure-torch reference kernels ------------------------------------------------------------------


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _torch_stats(x):
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dim=_reduce_dims(x), correction=0)
    return mean, var


def _torch_pre_activation(x, mean, scale, shift):
    xmu = x.to(mean.dtype) - _channel_view(mean, x)
    return xmu, xmu * _channel_view(scale, x) + _channel_view(shift, x)


def _torch_forward(x, mean, scale, shift, name, params):
    spec = get_spec(name)
    _, z = _torch_pre_activation(x, mean, scale, shift)
    return spec.reference(z, **spec.kwargs(tuple(params))).to(x.dtype)


def _torch_dz(grad_out, x, mean, scale, shift, name, params):
    spec = get_spec(name)
    xmu, z = _torch_pre_activation(x, mean, scale, shift)
    return xmu, grad_out.to(mean.dtype) * spec.derivative(z, **spec.kwargs(tuple(params)))


def _torch_backward_reduce(grad_out, x, mean, scale, shift, name, params):
    xmu, dz = _torch_dz(grad_out, x, mean, scale, shift, name, params)
    dims = _reduce_dims(x)
    return dz.sum(dims), (dz * xmu).sum(dims)


def _torch_backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const, name, params):
    xmu, dz = _torch_dz(grad_out, x, mean, scale, shift, name, params)
    grad_x = dz * _channel_view(scale, x) + xmu * _channel_view(coef_xmu, x)
    return (grad_x + _channel_view(coef_const, x)).to(x.dtype)


TORCH_KERNELS = BnActKernels(
    _torch_stats, _torch_forward, _torch_backward_reduce, _torch_backward_elemt
)


# -- compiled backends -----------------------------------------------------------------------------


def _extension_kernels() -> BnActKernels:
    module, reason = backends.extension()
    if module is None:
        raise RuntimeError(f"mishkit.batch_norm_act: the C++ extension is unavailable: {reason}")
    if not hasattr(torch.ops.mishkit, "bn_act_stats"):
        raise RuntimeError(
            "mishkit.batch_norm_act: mishkit._C was built without the BN+activation kernels; "
            "rebuild it (`python setup.py build_ext --inplace`)"
        )
    ops = torch.ops.mishkit
    return BnActKernels(
        ops.bn_act_stats, ops.bn_act_forward, ops.bn_act_backward_reduce, ops.bn_act_backward_elemt
    )


def _triton_kernels() -> BnActKernels:
    from . import triton_bn_act

    return triton_bn_act.KERNELS


_KERNEL_SETS: dict[str, Callable[[], BnActKernels]] = {
    "torch": lambda: TORCH_KERNELS,
    "cpu": _extension_kernels,
    "cuda": _extension_kernels,
    "triton": _triton_kernels,
}


def kernels_for(backend: str) -> BnActKernels:
    return _KERNEL_SETS[backend]()


def _register_extension_fakes() -> None:
    module, _ = backends.extension()
    if module is None or not hasattr(torch.ops.mishkit, "bn_act_stats"):
        return
    register_fakes("mishkit::bn_act_")


def register_fakes(prefix: str) -> None:
    """Fake (meta) kernels for one backend's four ops, named ``prefix + stats`` etc."""

    def channel_vector(x):
        return x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))

    @torch.library.register_fake(prefix + "stats")
    def _(x):
        return channel_vector(x), channel_vector(x)

    @torch.library.register_fake(prefix + "forward")
    def _(x, mean, scale, shift, name, params):
        return torch.empty_like(x)

    @torch.library.register_fake(prefix + "backward_reduce")
    def _(grad_out, x, mean, scale, shift, name, params):
        return channel_vector(x), channel_vector(x)

    @torch.library.register_fake(prefix + "backward_elemt")
    def _(grad_out, x, mean, scale, shift, coef_xmu, coef_const, name, params):
        return torch.empty_like(x)


_register_extension_fakes()


# -- cross-process statistics (SyncBatchNormAct2d) -------------------------------------------------


def _sync_stats(mean, var, count: int, group):
    """Combine per-rank (count, mean, biased var) over ``group``; counts may differ per rank."""
    import torch.distributed as dist

    if count == 0:  # an empty rank contributes nothing (its local stats are nan)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 2C + 1)
    channels = mean.numel()
    counts = table[:, -1:]
    total = counts.sum()
    means, variances = table[:, :channels], table[:, channels : 2 * channels]
    global_mean = (counts * means).sum(0) / total
    # parallel variance (Chan et al.): within-rank spread + spread of the rank means
    global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
    return global_mean, global_var, int(total.item())


def _all_reduce_sum(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    import torch.distributed as dist

    flat = torch.cat(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return list(flat.split([t.numel() for t in tensors]))


# -- autograd -------------------------------------------------------------------------------------


class BatchNormActFunction(torch.autograd.Function):
    """act(batch_norm(x)) with any backend's kernels; saves ``x`` + four ``(C,)`` vectors.

    Not twice differentiable: differentiating its gradients raises a RuntimeError.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                name, params, backend, process_group):
        kernels = kernels_for(backend)
        mean, invstd, scale, shift, count = normalization(
            kernels, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
            process_group)
        y = kernels.forward(x, mean, scale, shift, name, list(params))
        ctx.save_for_backward(x, mean, invstd, scale, shift)
        ctx.setup = (use_batch_stats, count, name, list(params), backend, process_group)
        ctx.param_dtypes = parameter_dtypes(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, *statistics = ctx.saved_tensors
        with torch.no_grad():
            grads = batch_norm_act_gradients(grad_out, x, statistics, ctx.setup,
                                             ctx.needs_input_grad[:3], ctx.param_dtypes)
        return *reject_double_backward(x, grads), *([None] * 9)


def normalization(kernels: BnActKernels, x, weight, bias, running_mean, running_var,
                  use_batch_stats: bool, momentum: float, eps: float, process_group):
    """``(mean, invstd, scale, shift, count)`` per channel, from the batch or the running stats.

    Batch statistics update the running buffers (if given) like BatchNorm. ``count`` is the number
    of values per channel (over the process group), None with running statistics.
    """
    compute = compute_dtype(x.dtype)
    channels = x.shape[1]
    count = None
    if use_batch_stats:
        mean, var = kernels.stats(x)
        count = x.numel() // channels if channels else 0
        if process_group is not None:
            mean, var, count = _sync_stats(mean, var, count, process_group)
        if count <= 1:
            raise ValueError(
                "mishkit.BatchNormAct2d: expected more than 1 value per channel when "
                f"training, got input size {list(x.shape)}"
                + (" (summed over the process group)" if process_group is not None else "")
            )
        if running_mean is not None:
            unbiased = var * (count / (count - 1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(compute, copy=True), running_var.to(compute)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(compute)
    shift = torch.zeros_like(mean) if bias is None else bias.to(compute, copy=True)
    return mean, invstd, scale, shift, count


def parameter_dtypes(weight, bias) -> tuple:
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def batch_norm_act_gradients(grad_out, x, statistics, setup, needs, param_dtypes):
    """``(grad_x, grad_weight, grad_bias)`` of ``act(batch_norm(x))`` from the saved state.

    ``statistics`` = (mean, invstd, scale, shift); ``setup`` = (use_batch_stats, count, name,
    params, backend, process_group); ``needs``: whether x / weight / bias need a gradient.
    """
    mean, invstd, scale, shift = statistics
    use_batch_stats, count, name, params, backend, group = setup
    need_x, need_weight, need_bias = needs
    kernels = kernels_for(backend)
    grad_out = grad_out.contiguous(memory_format=dense_format(x))
    grad_x = grad_weight = grad_bias = None
    sum_dz = sum_dz_xmu = None
    if need_weight or need_bias or (need_x and use_batch_stats):
        sum_dz, sum_dz_xmu = kernels.backward_reduce(grad_out, x, mean, scale, shift, name, params)
    if need_x:
        if use_batch_stats:
            total_dz, total_dz_xmu = sum_dz, sum_dz_xmu
            if group is not None:
                total_dz, total_dz_xmu = _all_reduce_sum([sum_dz, sum_dz_xmu], group)
            coef_xmu = -scale * invstd * invstd * (total_dz_xmu / count)
            coef_const = -scale * (total_dz / count)
        else:  # running statistics: BN is a fixed per-channel affine map
            coef_xmu = coef_const = torch.zeros_like(scale)
        grad_x = kernels.backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const,
                                        name, params)
    weight_dtype, bias_dtype = param_dtypes
    if need_weight:
        grad_weight = (sum_dz_xmu * invstd).to(weight_dtype)
    if need_bias:
        grad_bias = sum_dz.to(bias_dtype)
    return grad_x, grad_weight, grad_bias


def reject_double_backward(anchor: torch.Tensor, grads: tuple) -> tuple:
    """``grads``, made an error to differentiate when backward runs with create_graph=True."""
    if torch.is_grad_enabled():
        return _RaiseOnDoubleBackward.apply(anchor, *grads)
    return grads


class _RaiseOnDoubleBackward(torch.autograd.Function):
    """Identity on the gradients whose own backward raises: BN+act is not twice differentiable."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            "mishkit BatchNormAct2d does not support double backward (gradients of its gradients); "
            "use nn.BatchNorm2d followed by the activation where second derivatives are needed"
        )


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels index directly: NCHW-contiguous, else channels_last."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def batch_norm_act(x, running_mean, running_var, weight, bias, use_batch_stats: bool,
                   momentum: float, eps: float, name: str, params: tuple, backend: str = "auto",
                   process_group=None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(batch_norm(x, ...) [+ residual])`` fused; arguments as ``F.batch_norm`` + activation.

    ``x`` is ``(N, C, *)``. Contiguous and channels_last tensors are used as they are; any other
    strides are copied once to contiguous. ``process_group`` (training only) all-reduces the
    statistics like ``torch.nn.SyncBatchNorm``. ``residual`` (x's shape, dtype and device, any
    strides) is added before the activation (:mod:`mishkit.bn_add_act`).
    """
    op = f"batch_norm_act({name})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mishkit.{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mishkit.{op}: unsupported dtype {x.dtype}; expected a floating dtype")
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
    chosen = backends.choose(backend, x.device, op)
    x = x.contiguous(memory_format=dense_format(x))
    if residual is not None:
        from .bn_add_act import BatchNormAddActFunction, check_residual

        check_residual(residual, x, op)
        return BatchNormAddActFunction.apply(x, residual, weight, bias, running_mean, running_var,
                                             use_batch_stats, momentum, eps, spec.name, params,
                                             chosen, process_group)
    return BatchNormActFunction.apply(x, weight, bias, running_mean, running_var,
                                      use_batch_stats, momentum, eps, spec.name, params, chosen,
                                      process_group)
