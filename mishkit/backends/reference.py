"""The ``torch`` backend: pure-PyTorch kernels over the registry formulas, always available.

Activations are an ``autograd.Function`` with the compiled backends' contract (forward saves only
``x``; double backward works through the registry's differentiable derivative). The fused
BatchNorm + activation kernels are elementwise torch ops with the compiled kernels' signatures
(see :mod:`mishkit.batchnorm`): any layout, not fused, the reference the others are tested against.
"""

from __future__ import annotations

import torch

from .._checks import ActKernels, BnActKernels, KernelSet, compute_dtype
from ..registry import get_spec
from .autograd import save_input_function

# -- activations -----------------------------------------------------------------------------------


def _reference(x, name, params):
    spec = get_spec(name)
    return spec.reference(x.to(compute_dtype(x.dtype)), **spec.kwargs(params)).to(x.dtype)


def backward(grad_out, x, name, params):
    spec = get_spec(name)
    compute = compute_dtype(x.dtype)
    d = spec.derivative(x.to(compute), **spec.kwargs(tuple(params)))
    return (grad_out.to(compute) * d).to(x.dtype)


# Registry formulas; saves only ``x``; double backward via autograd.
ReferenceActivation = save_input_function("ReferenceActivation", _reference, backward)


def forward(x, name, params):
    return ReferenceActivation.apply(x, name, tuple(params))


def forward_(x, name, params):
    return x.copy_(forward(x, name, params))


# -- fused BatchNorm + activation ------------------------------------------------------------------


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def bn_act_stats(x):
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dim=_reduce_dims(x), correction=0)
    return mean, var


def _pre_activation(x, mean, scale, shift):
    xmu = x.to(mean.dtype) - _channel_view(mean, x)
    return xmu, xmu * _channel_view(scale, x) + _channel_view(shift, x)


def bn_act_forward(x, mean, scale, shift, name, params):
    spec = get_spec(name)
    _, z = _pre_activation(x, mean, scale, shift)
    return spec.reference(z, **spec.kwargs(tuple(params))).to(x.dtype)


def _dz(grad_out, x, mean, scale, shift, name, params):
    spec = get_spec(name)
    xmu, z = _pre_activation(x, mean, scale, shift)
    return xmu, grad_out.to(mean.dtype) * spec.derivative(z, **spec.kwargs(tuple(params)))


def bn_act_backward_reduce(grad_out, x, mean, scale, shift, name, params):
    xmu, dz = _dz(grad_out, x, mean, scale, shift, name, params)
    dims = _reduce_dims(x)
    return dz.sum(dims), (dz * xmu).sum(dims)


def bn_act_backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const, name, params):
    xmu, dz = _dz(grad_out, x, mean, scale, shift, name, params)
    grad_x = dz * _channel_view(scale, x) + xmu * _channel_view(coef_xmu, x)
    return (grad_x + _channel_view(coef_const, x)).to(x.dtype)


KERNELS = KernelSet(
    ActKernels(forward, forward_, backward),
    BnActKernels(bn_act_stats, bn_act_forward, bn_act_backward_reduce, bn_act_backward_elemt),
)
