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

import numpy
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from ..._checks import ActKernels, check_input, is_dense, same_layout
from ...registry import get_spec
from ..autograd import register_op_autograd
from . import interpret_mode
from .math import ACTIVATION_IDS, derivative_math, forward_math

INTERPRET = interpret_mode()
INTERPRET_BLOCK = 1024  # few interpreted programs, small numpy arrays
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)


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


_GPU_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((512, 4), (1024, 4), (2048, 8), (4096, 8))
]


@triton.jit
def _load_compute(ptr, offsets, mask):
    """Load in the compute dtype: float64 stays, half types widen to float32."""
    v = tl.load(ptr + offsets, mask=mask)
    if v.dtype == tl.float64:
        out = v
    elif v.dtype == tl.bfloat16:
        # by bits: exact for subnormals, which the interpreter's bf16 conversion loses
        bits = v.to(tl.uint16, bitcast=True).to(tl.uint32)
        out = (bits << 16).to(tl.float32, bitcast=True)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _store_compute(ptr, offsets, value, mask):
    """Store a compute-dtype value into ``ptr``'s dtype (round to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        half_bits = tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16)
        tl.store(ptr + offsets, half_bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _param(hi, lo, like):
    # a float64 parameter arrives as two float32 scalars (Triton passes Python floats as fp32)
    return tl.cast(hi, like.dtype) + tl.cast(lo, like.dtype)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, n, size_class, p0_hi, p0_lo, p1_hi, p1_lo,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: tensors may exceed 2**31 elements
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = _load_compute(x_ptr, offsets, mask)
    y = forward_math(x, _param(p0_hi, p0_lo, x), _param(p1_hi, p1_lo, x), ACT)
    _store_compute(y_ptr, offsets, y, mask)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, dx_ptr, n, size_class, p0_hi, p0_lo, p1_hi, p1_lo,
                     ACT: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = _load_compute(x_ptr, offsets, mask)
    grad = _load_compute(grad_ptr, offsets, mask)
    d = derivative_math(x, _param(p0_hi, p0_lo, x), _param(p1_hi, p1_lo, x), ACT)
    _store_compute(dx_ptr, offsets, grad * d, mask)


def _tuned(kernel, restore_value=None):
    """Autotune on GPU (keyed on activation and size class); the kernel itself when interpreted."""
    if INTERPRET:
        return kernel
    return triton.autotune(
        configs=_GPU_CONFIGS, key=["size_class", "ACT"], restore_value=restore_value
    )(kernel)


_FORWARD = _tuned(_forward_kernel)
# the in-place launch overwrites its input: the autotuner must restore it between trials
_FORWARD_INPLACE = _tuned(_forward_kernel, restore_value=["x_ptr"])
_BACKWARD = _tuned(_backward_kernel)
_LAUNCH_META = {"BLOCK": INTERPRET_BLOCK} if INTERPRET else {}


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
    if len(params) != len(spec.params):
        raise ValueError(
            f"mishkit::{op}: {spec.name} takes {len(spec.params)} parameter(s) "
            f"{list(spec.params)}, got {len(params)}: {list(params)}"
        )
    return ACTIVATION_IDS[spec.name], _split_params(params)


def _split_params(params) -> list[float]:
    """(p0_hi, p0_lo, p1_hi, p1_lo): each float64 value as float32 head + float32 remainder."""
    values = [float(p) for p in params] + [0.0] * (2 - len(params))
    split = []
    for value in values:
        if not abs(value) <= _FLOAT32_MAX:
            raise ValueError(f"mishkit triton backend: parameter {value!r} exceeds float32 range")
        head = float(numpy.float32(value))  # numpy, not torch: this also runs under fake tensors
        split += [head, float(numpy.float32(value - head))]
    return split


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if is_dense(t) else t.contiguous()


def _launch(kernel, tensors: tuple, act: int, params) -> None:
    """Launch over the flat storage of ``tensors`` (one layout); nothing for empty tensors."""
    n = tensors[0].numel()
    if n == 0:
        return
    if isinstance(tensors[0], FakeTensor) and _triton_op is _opaque_op:
        return  # fake kernel of the opaque op: shapes only (triton_op traces launches instead)
    # autotune key: the size's power of two (0 for a symbolic size under torch.compile)
    size_class = n.bit_length() if isinstance(n, int) else 0
    _wrap_triton(kernel)[_grid(n)](*tensors, n, size_class, *params, ACT=act, **_LAUNCH_META)


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
