"""The ground floor every layer may use: supported dtypes, the compute dtype, input and layout
checks, and the types of a backend's kernel set. Imports nothing from mishkit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 computes in float64; float32 and the half types compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x, name: str) -> None:
    """TypeError naming ``mishkit.<name>`` unless ``x`` is a tensor of a supported float dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mishkit.{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"mishkit.{name}: unsupported dtype {x.dtype}; expected float32, float64, float16 "
            "or bfloat16"
        )


def is_dense(t: torch.Tensor) -> bool:
    """Elements fill one gap-free block of storage (any dim order): processable as flat memory."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever they matter (strides of size-1 dims never do)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (of ``like``'s shape) if it already has dense ``like``'s layout (:func:`same_layout`),
    else a copy with exactly ``like``'s strides: kernels then index both with one offset."""
    if same_layout(t, like):
        return t
    return torch.empty_like(like).copy_(t)


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the BN+act kernels index directly: NCHW-contiguous, else channels-last
    (channels innermost: ``channels_last`` for 4-D, ``channels_last_3d`` for 5-D tensors)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class ActKernels(NamedTuple):
    """One backend's activation kernels, each ``(..., name, params: list[float])``.

    ``forward(x) -> y``; ``forward_(x) -> x`` (in place, eager only: under torch.compile the
    dispatch writes back an out-of-place result); ``backward(grad_out, x) -> grad_out * f'(x)``.
    """

    forward: Callable
    forward_: Callable
    backward: Callable


class BnActKernels(NamedTuple):
    """One backend's four fused BatchNorm + activation kernels (see mishkit.batchnorm).

    ``backward_reduce_dz`` (CPU only, else None) is ``backward_reduce`` that also returns
    ``dz = grad_out * act'(z)``, so that backward evaluates the derivative once.
    """

    stats: Callable
    forward: Callable
    backward_reduce: Callable
    backward_elemt: Callable
    backward_reduce_dz: Callable | None = None


class BnActOutputKernels(NamedTuple):
    """One backend's three BatchNorm + activation kernels that save only the output (see
    mishkit.batchnorm.output): ``forward -> (y, branch mask)``, ``backward_reduce`` and
    ``backward_elemt`` recovering the pre-activation from ``y`` and the mask."""

    forward: Callable
    backward_reduce: Callable
    backward_elemt: Callable


class KernelSet(NamedTuple):
    """Everything a chosen backend runs: activation and BatchNorm + activation kernels."""

    act: ActKernels
    bn_act: BnActKernels
    bn_act_output: BnActOutputKernels | None = None  # None: the backend saves inputs only
