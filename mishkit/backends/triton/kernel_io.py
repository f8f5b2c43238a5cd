"""What the Triton kernel modules share besides the formulas: dtype conversions around loads and
stores, activation parameters passed as scalar kernel arguments, and the launch geometry.

* :func:`widen` / :func:`narrow`: storage dtype <-> compute dtype (float64 stays float64, the
  others compute in float32, round to nearest even once). Compiled, they are the native casts
  (one instruction each); the CPU interpreter's bfloat16 casts flush subnormals, so there they go
  by bits.
* :func:`check_bn_tensors`: the BatchNorm + activation ops' tensor arguments.
* :func:`split_params`: the activation parameters as four Python floats for the kernel's scalar
  arguments ``p0_hi, p0_lo, p1_hi, p1_lo`` (Triton passes a Python float as float32; the float32
  head plus the float32 remainder carry a float64 value to float64 kernels). No tensor is built:
  no host-to-device copy, nothing that breaks CUDA-graph capture.
"""

from __future__ import annotations

import functools
import math

import numpy
import torch
import triton
import triton.language as tl

from ..._checks import compute_dtype, dense_format, same_layout
from ...registry import ActivationSpec
from . import interpret_mode

INTERPRET = tl.constexpr(interpret_mode())
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)


@triton.jit
def widen(v):
    """``v`` (a loaded block) in its compute dtype: float64 stays, the others become float32."""
    if v.dtype == tl.float64 or v.dtype == tl.float32:
        out = v
    elif v.dtype == tl.bfloat16:
        if INTERPRET:  # by bits: exact for subnormals, which the interpreter's cast loses
            bits = v.to(tl.uint16, bitcast=True).to(tl.uint32)
            out = (bits << 16).to(tl.float32, bitcast=True)
        else:
            out = v.to(tl.float32)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def narrow(value, dtype: tl.constexpr):
    """``value`` (compute dtype) rounded to nearest even into the storage ``dtype``."""
    if dtype == tl.bfloat16:
        if INTERPRET:  # by bits, as widen
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
            out = tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = value.to(tl.bfloat16)
    else:
        out = value.to(dtype)
    return out


@triton.jit
def param(hi, lo, like):
    """A parameter from its two float32 scalars, in ``like``'s (compute) dtype."""
    return tl.cast(hi, like.dtype) + tl.cast(lo, like.dtype)


def split_params(op: str, spec: ActivationSpec, params) -> list[float]:
    """``[p0_hi, p0_lo, p1_hi, p1_lo]`` for ``spec``'s kernel parameters (missing ones are 0).

    ±inf is carried as (inf, 0) where the registry allows it (a threshold); NaN, other infinities
    and values beyond float32's range are errors naming ``op``.
    """
    names = list(spec.params)
    if len(params) != len(names):
        raise ValueError(f"mishkit::{op}: {spec.name} takes {len(names)} parameter(s) {names}, "
                         f"got {len(params)}: {list(params)}")
    split: list[float] = []
    for key, value in zip(names, (float(p) for p in params)):
        if math.isnan(value) or (math.isinf(value) and key not in spec.infinite_params):
            raise ValueError(f"mishkit::{op}: {spec.name} parameter {key!r} must be finite, got "
                             f"{value!r}")
        if math.isinf(value):
            split += [value, 0.0]
            continue
        if abs(value) > _FLOAT32_MAX:
            raise ValueError(f"mishkit triton backend: parameter {value!r} exceeds float32 range")
        head = float(numpy.float32(value))  # numpy, not torch: this also runs under fake tensors
        split += [head, float(numpy.float32(value - head))]
    return split + [0.0] * (4 - len(split))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_to_fill(device: torch.device) -> int:
    """How many programs of a reduction keep ``device`` busy: a few waves of its SMs (under the
    interpreter a handful, so the tests cover the cross-program combination)."""
    if interpret_mode() or device.type != "cuda":
        return 8
    return 8 * _multiprocessors(device.index if device.index is not None else
                                torch.cuda.current_device())


def check_bn_tensors(op: str, x: torch.Tensor, vectors=(), same: dict | None = None) -> None:
    """``x`` dense ``(N, C, *)`` (contiguous, channels_last or channels_last_3d), ``vectors``
    ``(C,)`` in the compute dtype, and the ``same`` tensors (by name; None skipped) with x's shape
    and strides on the dims of size > 1. Checked with ``torch._check``, so fake tensors check
    too."""
    torch._check(x.dim() >= 2, lambda: f"{op}: expected an (N, C, ...) tensor, got {list(x.shape)}")
    torch._check(x.is_contiguous() or dense_format(x) is not torch.contiguous_format,
                 lambda: f"{op}: x must be contiguous, channels_last (4-D) or channels_last_3d "
                         f"(5-D), got strides {x.stride()} (batch_norm_act makes it so)")
    for v in vectors:
        torch._check(v.shape == (x.shape[1],) and v.dtype == compute_dtype(x.dtype),
                     lambda v=v: f"{op}: per-channel vectors must be (C,) in the compute "
                                 f"dtype {compute_dtype(x.dtype)}, got {list(v.shape)} {v.dtype}")
    for name, t in (same or {}).items():
        if t is not None:
            torch._check(same_layout(t, x) and t.shape == x.shape,
                         lambda name=name, t=t: f"{op}: {name} must have x's shape "
                         f"{list(x.shape)} and strides {x.stride()} (on the dims of size > 1), "
                         f"got {list(t.shape)} {t.stride()}")
