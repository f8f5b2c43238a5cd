"""BatchNorm + activation that saves only its output: ``saves="output"``.

In a conv -> BN -> act -> conv chain the next layer saves ``y = act(bn(x))`` anyway; saving ``x``
too (``saves="input"``) keeps two full tensors per block. :class:`BatchNormActOutputFunction`
saves ``y``, one bit per element (the branch of ``z = bn(x)``: left of the activation's minimum,
or not) and three ``(C,)`` vectors, so autograd holds one storage for both layers. Backward
recovers ``z`` from ``y`` and the bit (:mod:`mishkit.backends.inversion`), then
``x - mean = (z - beta [- r]) / (gamma invstd)``, and runs BatchNorm + activation's backward from
them.

Kernel contract, per backend (``KernelSet.bn_act_output``; per-channel vectors ``(C,)`` in the
compute dtype, ``mask`` uint8 of ``ceil(numel / 8)`` bytes in storage order)::

    forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, float branch,
            str name, float[] params) -> (Tensor y, Tensor mask)    # bit = z < branch
    backward_reduce(Tensor grad_out, Tensor y, Tensor mask, Tensor scale, Tensor shift,
                    Tensor? residual, Tensor table, str name, float[] params)
        -> (Tensor sum_dz, Tensor sum_dz_xmu, Tensor z)
    backward_elemt(Tensor grad_out, Tensor y, Tensor mask, Tensor z, Tensor scale, Tensor shift,
                   Tensor? residual, Tensor coef_xmu, Tensor coef_const, Tensor table, str name,
                   float[] params) -> (Tensor grad_x, Tensor grad_residual)  # empty without r

``z`` is the recovered pre-activation (compute dtype, y's layout) that backward_reduce may keep
for backward_elemt (the CPU and torch kernels do: an inversion costs more than the memory
traffic there), or an empty tensor, with which backward_elemt recovers it again (CUDA, Triton).

The residual form ``act(bn(x) + r)`` saves ``r`` as well (usually the block input, which the
block's first convolution saves anyway) and subtracts it from the recovered ``z``.

Where ``y`` cannot determine ``x`` the call saves its input instead (:func:`output_unusable`):
a channel with ``gamma = 0`` (every ``y`` is ``act(beta)``), or ``|beta / gamma|`` so large that
the rounding of ``y`` would blur ``x - mean`` by more than 1/8 of a standard deviation
(``|beta / gamma| > 2^-3 / u`` with ``u`` the unit roundoff of the dtype: 32 for bfloat16, 256 for
float16, 2e6 for float32).
"""

from __future__ import annotations

import warnings

import torch

from .. import backends
from .._checks import match_layout
from ..backends.inversion import branch_point, inverse_table, invertibility_error
from .autograd import normalization, parameter_dtypes, reject_double_backward
from .distributed import all_reduce_sum

SAVES = ("input", "output")
# x - mean is recovered to (rounding of y) * |z| / |gamma|: keep that below 1/8 of a std
_RESOLUTION = 1 / 8


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def check_saves(saves, where: str) -> str:
    if saves not in SAVES:
        raise ValueError(f"{where}: saves must be 'input' or 'output', got {saves!r}")
    return saves


def check_invertible(name: str, params: tuple, where: str) -> None:
    """ValueError naming the activation unless ``saves="output"`` can invert it."""
    reason = invertibility_error(name, params)
    if reason is not None:
        raise ValueError(
            f"{where}: saves='output' recovers the BatchNorm output from the activation's output, "
            f"but activation {name!r} cannot be inverted ({reason}); use saves='input' (the "
            "default), which saves the BatchNorm input instead"
        )


def output_unusable(weight, bias, dtype: torch.dtype) -> str | None:
    """Why ``y`` would not determine ``x`` for these affine parameters, or None.

    One device sync (a (C,) reduction) per call when the layer is affine.
    """
    if weight is None:
        return None
    gamma = weight.detach().abs().float()
    beta = bias.detach().abs().float() if bias is not None else torch.zeros_like(gamma)
    blurred = gamma * _RESOLUTION <= beta * _unit_roundoff(dtype)
    if not bool(blurred.any()):
        return None
    channels = blurred.nonzero().flatten().tolist()
    shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
    return (f"channel(s) {shown} have weight 0 or |bias / weight| > "
            f"{_RESOLUTION / _unit_roundoff(dtype):.3g}, where the {dtype} output no longer "
            "determines the input")


def saves_output(x, weight, bias, residual, where: str) -> bool:
    """Whether this call takes the output-saving path: autograd will need a backward, and the
    affine parameters let ``y`` determine ``x`` (else a RuntimeWarning and the input path)."""
    tensors = (x, weight, bias, residual)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return False  # nothing is saved: the input-saving kernels are the cheaper forward
    reason = output_unusable(weight, bias, x.dtype)
    if reason is not None:
        warn_fallback(reason, where)
        return False
    return True


def warn_fallback(reason: str, where: str) -> None:
    warnings.warn(f"mishkit.{where}(saves='output'): {reason}; such calls save their input "
                  "instead (as saves='input')", RuntimeWarning, stacklevel=4)


class BatchNormActOutputFunction(torch.autograd.Function):
    """act(batch_norm(x) [+ residual]) saving ``y``, the branch bits, ``residual`` and three
    ``(C,)`` vectors. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, use_batch_stats,
                momentum, eps, name, params, backend, process_group):
        kernels = backends.kernels(backend)
        mean, invstd, scale, shift, count = normalization(
            kernels.bn_act, x, weight, bias, running_mean, running_var, use_batch_stats,
            momentum, eps, process_group)
        y, mask = kernels.bn_act_output.forward(x, mean, scale, shift, residual,
                                                branch_point(name, params), name, list(params))
        ctx.save_for_backward(y, mask, residual, invstd, scale, shift)
        ctx.setup = (use_batch_stats, count, name, list(params), backend, process_group)
        ctx.param_dtypes = parameter_dtypes(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, mask, residual, invstd, scale, shift = ctx.saved_tensors
        use_batch_stats, count, name, params, backend, group = ctx.setup
        need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        kernels = backends.kernels(backend).bn_act_output
        table = inverse_table(name, y.dtype, y.device)
        with torch.no_grad():
            grad_out = match_layout(grad_out, y)  # size-1 dims are layout-neutral: no copy
            grad_x = grad_residual = grad_weight = grad_bias = None
            sum_dz = sum_dz_xmu = None
            z = scale.new_empty(0)  # none yet: backward_elemt recovers it
            if need_weight or need_bias or (need_x and use_batch_stats):
                sum_dz, sum_dz_xmu, z = kernels.backward_reduce(grad_out, y, mask, scale, shift,
                                                                residual, table, name, params)
            if need_x or need_residual:
                coef_xmu, coef_const = input_coefficients(sum_dz, sum_dz_xmu, scale, invstd,
                                                          count, use_batch_stats, group)
                grad_x, grad_residual = kernels.backward_elemt(
                    grad_out, y, mask, z, scale, shift, residual, coef_xmu, coef_const, table,
                    name, params)
                del z
            weight_dtype, bias_dtype = ctx.param_dtypes
            if need_weight:
                grad_weight = (sum_dz_xmu * invstd).to(weight_dtype)
            if need_bias:
                grad_bias = sum_dz.to(bias_dtype)
        grads = (grad_x if need_x else None, grad_residual if need_residual else None,
                 grad_weight, grad_bias)
        return *reject_double_backward(y, grads), *([None] * 9)


def input_coefficients(sum_dz, sum_dz_xmu, scale, invstd, count, use_batch_stats, group):
    """``(coef_xmu, coef_const)`` of ``grad_x = dz * scale + (x - mean) * coef_xmu + coef_const``:
    batch statistics differentiate through the mean and variance; running ones do not."""
    if not use_batch_stats:
        return torch.zeros_like(scale), torch.zeros_like(scale)
    if group is not None:
        sum_dz, sum_dz_xmu = all_reduce_sum([sum_dz, sum_dz_xmu], group)
    return -scale * invstd * invstd * (sum_dz_xmu / count), -scale * (sum_dz / count)
