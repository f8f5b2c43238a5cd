"""The ``torch`` backend's output-saving BatchNorm + activation kernels: torch ops over the
registry formulas and :func:`~mishkit.backends.inversion.invert` (the contract:
:mod:`mishkit.batchnorm.output`). Not fused; the reference the compiled kernels are tested
against.

The branch mask is bit-packed in storage order: bit ``k`` of byte ``i`` is element ``8 i + k`` of
the tensor's flat storage (NCHW-contiguous or channels_last), as in every backend.
"""

from __future__ import annotations

import torch

from .._checks import BnActOutputKernels, dense_format
from ..registry import get_spec
from .inversion import invert

_BIT_WEIGHTS = [1 << k for k in range(8)]


def _storage_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in storage order."""
    if t.is_contiguous():
        return t.reshape(-1)
    if dense_format(t) is not torch.contiguous_format:  # channels_last or channels_last_3d
        return t.movedim(1, -1).reshape(-1)
    raise ValueError("the output-saving BatchNorm + activation kernels take NCHW-contiguous, "
                     f"channels_last or channels_last_3d tensors, got strides {t.stride()}")


def _from_storage_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous():
        return flat.view(like.shape)
    n, c, *spatial = like.shape
    return flat.view(n, *spatial, c).movedim(-1, 1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 bytes holding ``bits`` (bool, dense) in storage order, 8 per byte, low bit first."""
    flat = _storage_order(bits).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool tensor (``like``'s shape and layout) that :func:`pack_bits` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    flat = ((mask[:, None] >> shifts) & 1).view(-1)[: like.numel()].bool()
    return _from_storage_order(flat, like)


def _channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def bn_act_output_forward(x, mean, scale, shift, residual, branch, name, params):
    spec = get_spec(name)
    z = (x.to(mean.dtype) - _channel(mean, x)) * _channel(scale, x) + _channel(shift, x)
    if residual is not None:
        z = z + residual.to(mean.dtype)
    y = torch.empty_like(x)  # x's dense layout
    y.copy_(spec.reference(z, **spec.kwargs(tuple(params))))
    return y, pack_bits(z < branch)


def _recover(grad_out, y, mask, z, scale, shift, residual, table, name, params):
    """``(dz, xmu, z)``: ``grad_out * f'(z)``, ``x - mean`` and ``z``, recovered from the output
    and the mask unless ``z`` is given (not empty)."""
    spec = get_spec(name)
    compute = scale.dtype
    if z is None or z.numel() == 0:
        z = invert(y.to(compute), unpack_bits(mask, y), table, name, tuple(params), y.dtype)
    u = z - _channel(shift, y)
    if residual is not None:
        u = u - residual.to(compute)
    dz = grad_out.to(compute) * spec.derivative(z, **spec.kwargs(tuple(params)))
    return dz, u / _channel(scale, y), z


def bn_act_output_backward_reduce(grad_out, y, mask, scale, shift, residual, table, name,
                                  params):
    dz, xmu, z = _recover(grad_out, y, mask, None, scale, shift, residual, table, name, params)
    dims = _reduce_dims(y)
    return dz.sum(dims), (dz * xmu).sum(dims), z


def bn_act_output_backward_elemt(grad_out, y, mask, z, scale, shift, residual, coef_xmu,
                                 coef_const, table, name, params):
    dz, xmu, _ = _recover(grad_out, y, mask, z, scale, shift, residual, table, name, params)
    grad_x = torch.empty_like(y)
    grad_x.copy_(dz * _channel(scale, y) + xmu * _channel(coef_xmu, y) + _channel(coef_const, y))
    if residual is None:
        return grad_x, y.new_empty(0)
    grad_residual = torch.empty_like(y)
    return grad_x, grad_residual.copy_(dz)


KERNELS = BnActOutputKernels(bn_act_output_forward, bn_act_output_backward_reduce,
                             bn_act_output_backward_elemt)
