"""Triton backend: fused forward/backward kernels for every registry activation.

Registers ``torch.ops.mishkit.triton_act_forward / triton_act_forward_ / triton_act_backward``
(the same schemas as the C++ ``act_*`` ops). On GPU the out-of-place pair is built with
``torch.library.triton_op`` + ``wrap_triton``, so ``torch.compile`` sees the Triton kernels
themselves, and the block size is autotuned. Under ``TRITON_INTERPRET=1`` (CI, CPU tensors) the
ops are opaque custom ops with a fixed configuration: interpreted kernels can be neither traced
nor timed.

Layout: dense tensors (any strides, e.g. channels_last) are processed as flat storage and the
output is ``empty_like(x)`` with the same strides; only non-dense inputs are made contiguous.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from triton.runtime.autotuner import Autotuner

from ..._checks import ActKernels, check_input, is_dense, same_layout
from ...registry import get_spec
from ..autograd import register_inplace_kernels, register_op_autograd
from . import interpret_mode
from .kernel_io import narrow, param, split_params, widen
from .math import ACTIVATION_IDS, derivative_math, forward_math

INTERPRET = interpret_mode()
INTERPRET_BLOCK = 1024  # few interpreted programs, small numpy arrays
# MISHKIT_TRITON_AUTOTUNE=0: one fixed config instead of tuning per (activation, size, dtype);
# each tuning compiles and times every config, which dominates short correctness runs.
AUTOTUNE = not INTERPRET and os.environ.get("MISHKIT_TRITON_AUTOTUNE", "1") != "0"


def _opaque_op(name, *, mutates_args):
    """custom_op whose fake kernel is the function itself (launches are skipped on fake data)."""

    def register(fn):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op

    return register


# torch.library.triton_op (torch >= 2.6) lets torch.compile see and fuse the Triton kernels. It
# is not used when interpreting: torch cannot trace interpreted kernels, and the op would be
# decomposed into an untraceable launch; as an opaque custom_op it stays a graph node that runs
# the interpreter eagerly. Torch without triton_op falls back to custom_op as well.
_triton_op = getattr(torch.library, "triton_op", None)
_wrap_triton = getattr(torch.library, "wrap_triton", None)
if INTERPRET or _triton_op is None or _wrap_triton is None:
    _triton_op = _opaque_op

    def _wrap_triton(kernel):
        return kernel


# Every config keeps >= 32 bytes of input in flight per thread (BLOCK / (32 num_warps) elements,
# e.g. two 16-byte vectors of float32): fewer leave an H100/H200 short of memory parallelism.
_GPU_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
]
_MIN_BYTES_PER_THREAD = 32
FIXED_CONFIG = _GPU_CONFIGS[1]  # without autotuning: 16 elements per thread, any dtype
ITEMSIZES = (2, 4, 8)


def configs_for(itemsize: int) -> list:
    """The configs that give each thread >= 32 bytes of elements of ``itemsize`` (16 bf16)."""
    return [c for c in _GPU_CONFIGS
            if c.kwargs["BLOCK"] // (32 * c.num_warps) * itemsize >= _MIN_BYTES_PER_THREAD]


@triton.jit
def _forward_block(x_ptr, y_ptr, offsets, mask, p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr):
    x = widen(tl.load(x_ptr + offsets, mask=mask))
    y = forward_math(x, param(p0_hi, p0_lo, x), param(p1_hi, p1_lo, x), ACT)
    tl.store(y_ptr + offsets, narrow(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n", "size_class"])
def _forward_kernel(x_ptr, y_ptr, n, size_class, p0_hi, p0_lo, p1_hi, p1_lo,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: tensors may exceed 2**31 elements. Full blocks go unmasked, so their loads
    # and stores are full-width vectors whatever n is; only the last block is masked.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _forward_block(x_ptr, y_ptr, offsets, None, p0_hi, p0_lo, p1_hi, p1_lo, ACT)
    else:
        _forward_block(x_ptr, y_ptr, offsets, offsets < n, p0_hi, p0_lo, p1_hi, p1_lo, ACT)


@triton.jit
def _backward_block(grad_ptr, x_ptr, dx_ptr, offsets, mask, p0_hi, p0_lo, p1_hi, p1_lo,
                    ACT: tl.constexpr):
    x = widen(tl.load(x_ptr + offsets, mask=mask))
    grad = widen(tl.load(grad_ptr + offsets, mask=mask))
    d = derivative_math(x, param(p0_hi, p0_lo, x), param(p1_hi, p1_lo, x), ACT)
    tl.store(dx_ptr + offsets, narrow(grad * d, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n", "size_class"])
def _backward_kernel(grad_ptr, x_ptr, dx_ptr, n, size_class, p0_hi, p0_lo, p1_hi, p1_lo,
                     ACT: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _backward_block(grad_ptr, x_ptr, dx_ptr, offsets, None, p0_hi, p0_lo, p1_hi, p1_lo, ACT)
    else:
        _backward_block(grad_ptr, x_ptr, dx_ptr, offsets, offsets < n, p0_hi, p0_lo, p1_hi,
                        p1_lo, ACT)


def _tuned(kernel, restore_value=None, autotune: bool | None = None) -> dict:
    """Per element size: the kernel autotuned over :func:`configs_for` that size (keyed on
    activation, size class and dtypes), or the kernel itself, launched with
    :func:`_launch_meta` (interpreter, or MISHKIT_TRITON_AUTOTUNE=0). One autotuner per size
    rather than ``prune_configs_by``, which not every torch.compile version traces."""
    if not (AUTOTUNE if autotune is None else autotune):
        return dict.fromkeys(ITEMSIZES, kernel)
    return {size: triton.autotune(configs=configs_for(size), key=["size_class", "ACT"],
                                  restore_value=restore_value)(kernel) for size in ITEMSIZES}


_FORWARD = _tuned(_forward_kernel)
# the in-place launch overwrites its input: the autotuner must restore it between trials
_FORWARD_INPLACE = _tuned(_forward_kernel, restore_value=["x_ptr"])
_BACKWARD = _tuned(_backward_kernel)


def _launch_meta(kernel) -> dict:
    """Launch options of a kernel :func:`_tuned` did not wrap in an autotuner."""
    if isinstance(kernel, Autotuner):
        return {}
    if INTERPRET:
        return {"BLOCK": INTERPRET_BLOCK}
    return {"BLOCK": FIXED_CONFIG.kwargs["BLOCK"], "num_warps": FIXED_CONFIG.num_warps}


def _grid(n: int):
    # a closure over n, not meta["n"]: Inductor evaluates grids with only the config's meta
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


# -- argument checks (the same messages as the other backends) ------------------------------------


def _resolve(op: str, x, name: str, params) -> tuple[int, list[float]]:
    """Validate x/name/params; return the activation id and the split (hi, lo) parameters."""
    spec = get_spec(name)
    check_input(x, spec.name)
    device = x.device
    if not (device.type == "cuda" or (device.type == "cpu" and INTERPRET)):
        raise RuntimeError(
            f"mishkit::{op} ({spec.name}): triton runs on CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got a tensor on {device}"
        )
    return ACTIVATION_IDS[spec.name], split_params(op, spec, params)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if is_dense(t) else t.contiguous()


def _launch(kernels: dict, tensors: tuple, act: int, params) -> None:
    """Launch over the flat storage of ``tensors`` (one layout); nothing for empty tensors."""
    kernel = kernels[tensors[0].element_size()]
    n = tensors[0].numel()
    if n == 0:
        return
    if isinstance(tensors[0], FakeTensor) and _triton_op is _opaque_op:
        return  # fake kernel of the opaque op: shapes only (triton_op traces launches instead)
    # autotune key: the size's power of two (0 for a symbolic size under torch.compile)
    size_class = n.bit_length() if isinstance(n, int) else 0
    _wrap_triton(kernel)[_grid(n)](*tensors, n, size_class, *params, ACT=act,
                                   **_launch_meta(kernel))


# -- the ops ---------------------------------------------------------------------------------------


@_triton_op("mishkit::triton_act_forward", mutates_args=())
def _triton_act_forward(x: torch.Tensor, name: str, params: list[float]) -> torch.Tensor:
    act, split = _resolve("triton_act_forward", x, name, params)
    x = _dense(x)
    out = torch.empty_like(x)
    _launch(_FORWARD, (x, out), act, split)
    return out


@_triton_op("mishkit::triton_act_backward", mutates_args=())
def _triton_act_backward(
    grad_out: torch.Tensor, x: torch.Tensor, name: str, params: list[float]
) -> torch.Tensor:
    act, split = _resolve("triton_act_backward", x, name, params)
    spec_name = get_spec(name).name
    if not isinstance(grad_out, torch.Tensor) or not grad_out.is_floating_point():
        got = grad_out.dtype if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__
        raise TypeError(f"mishkit.{spec_name} backward: grad_out must be a float tensor, got {got}")
    if grad_out.device != x.device:
        raise RuntimeError(
            f"mishkit.{spec_name} backward: grad_out is on {grad_out.device} but x is on {x.device}"
        )
    if grad_out.shape != x.shape:
        raise RuntimeError(
            f"mishkit.{spec_name} backward: grad_out has shape {tuple(grad_out.shape)} but x has "
            f"shape {tuple(x.shape)}"
        )
    x = _dense(x)
    if grad_out.dtype != x.dtype or not same_layout(grad_out, x):
        grad_out = torch.empty_like(x).copy_(grad_out)  # x's dtype and strides: one flat map
    grad_in = torch.empty_like(x)
    _launch(_BACKWARD, (grad_out, x, grad_in), act, split)
    return grad_in


# The in-place op returns its (mutated) input, as the C++ act_forward_ does. custom_op/triton_op
# forbid outputs that alias inputs, so it is defined on a plain library fragment.
_LIB = torch.library.Library("mishkit", "FRAGMENT")
_LIB.define("triton_act_forward_(Tensor(a!) x, str name, float[] params) -> Tensor(a!)")


def _triton_act_forward_(x: torch.Tensor, name: str, params: list[float]) -> torch.Tensor:
    act, split = _resolve("triton_act_forward_", x, name, params)
    if is_dense(x):
        _launch(_FORWARD_INPLACE, (x, x), act, split)
    else:
        x.copy_(_triton_act_forward(x, name, params))
    return x


for _device_key in ("CPU", "CUDA"):
    _LIB.impl("triton_act_forward_", _triton_act_forward_, _device_key)
register_inplace_kernels(_LIB, "triton_act_forward_", "mishkit::triton_act_forward")


@torch.library.register_fake("mishkit::triton_act_forward_", lib=_LIB)
def _(x, name, params):
    return x


forward = torch.ops.mishkit.triton_act_forward
backward = torch.ops.mishkit.triton_act_backward
forward_inplace_op = torch.ops.mishkit.triton_act_forward_


def forward_(x: torch.Tensor, name: str, params: list[float]) -> torch.Tensor:
    """In-place forward. Under torch.compile it is traced as out-of-place + copy_, because
    functionalization rejects custom ops whose output aliases an input (``-> Tensor(a!)``)."""
    if torch.compiler.is_compiling():
        return x.copy_(forward(x, name, params))
    return forward_inplace_op(x, name, params)


register_op_autograd("mishkit::triton_act_forward", "mishkit::triton_act_backward", backward)

KERNELS = ActKernels(forward, forward_, backward)


def kernel_names() -> list[str]:
    """Activations with Triton kernels (must equal the registry's canonical names)."""
    return sorted(ACTIVATION_IDS)
