"""The ``cpu`` and ``cuda`` backends: the compiled ``mishkit._C`` and its ops' Python side.

``csrc/library.cpp`` defines every ``torch.ops.mishkit`` schema; the C++ registers the CPU and
CUDA kernels and the activations' autograd. What only Python can register lives here, next to
the ops it serves: fake (meta) kernels, so torch.compile and opcheck can trace the ops without
running them, and the double backward (it differentiates the registry's derivative formula).
Loading never makes ``import mishkit`` fail: a missing or broken build gives one warning and the
reason, and the other backends stay usable.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .._checks import ActKernels, BnActKernels, BnActOutputKernels, KernelSet, compute_dtype
from .autograd import register_double_backward


def _load():
    if os.environ.get("MISHKIT_DISABLE_EXT") == "1":
        return None, "disabled by MISHKIT_DISABLE_EXT=1"
    try:
        module = importlib.import_module("mishkit._C")
    except ModuleNotFoundError as exc:
        if exc.name != "mishkit._C":
            reason = f"mishkit._C failed to load: {exc}"
        else:
            reason = (
                "mishkit._C is not built (installed with MISHKIT_NO_EXT=1, or not rebuilt "
                "after a clean); reinstall with `pip install --no-build-isolation -e .`"
            )
    except (ImportError, OSError) as exc:
        reason = f"mishkit._C failed to load (ABI mismatch with torch {torch.__version__}?): {exc}"
    else:
        return module, None
    warnings.warn(
        f"mishkit: C++/CUDA kernels unavailable: {reason}. Falling back to Triton (GPU) or the "
        "pure-torch reference (CPU).",
        RuntimeWarning,
        stacklevel=2,
    )
    return None, reason


# Loaded once at import, as a plain module attribute: torch.compile traces lookups as constants.
MODULE, REASON = _load()
# act_forward(_)'s entry for plain eager calls, or None for any call it does not serve
# (csrc/act_eager.cpp): the torch.ops call path cost 3-10% of a memory-bound forward
EAGER_FORWARD = MODULE.act_forward_eager if MODULE is not None else None


def _register_activation_ops() -> None:
    @torch.library.register_fake("mishkit::act_forward")
    def _(x, name, params):
        return torch.empty_like(x)

    @torch.library.register_fake("mishkit::act_forward_")
    def _(x, name, params):
        return x

    @torch.library.register_fake("mishkit::act_backward")
    def _(grad_out, x, name, params):
        torch._check(grad_out.shape == x.shape, lambda: "grad_out and x must have one shape")
        return torch.empty_like(x)

    # act_forward's autograd is C++ (csrc/act_autograd.cpp); it calls act_backward, whose own
    # autograd (double backward) is this one
    register_double_backward("mishkit::act_backward", torch.ops.mishkit.act_backward)


def register_bn_act_fakes(prefix: str) -> None:
    """Fake kernels for one backend's four BN+act ops, named ``prefix + "stats"`` etc."""

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


def _register_cpu_bn_act_fakes() -> None:
    @torch.library.register_fake("mishkit::bn_act_backward_reduce_dz")
    def _(grad_out, x, mean, scale, shift, name, params):
        channel_vector = x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))
        return channel_vector, torch.empty_like(channel_vector), torch.empty_like(x)


def _kernel_set() -> KernelSet:
    ops = torch.ops.mishkit
    return KernelSet(
        ActKernels(ops.act_forward, ops.act_forward_, ops.act_backward),
        BnActKernels(ops.bn_act_stats, ops.bn_act_forward, ops.bn_act_backward_reduce,
                     ops.bn_act_backward_elemt, ops.bn_act_backward_reduce_dz),
    )


KERNELS: KernelSet | None = None
if MODULE is not None:
    _register_activation_ops()
    register_bn_act_fakes("mishkit::bn_act_")
    _register_cpu_bn_act_fakes()
    KERNELS = _kernel_set()


def register_bn_act_output_fakes(prefix: str) -> None:
    """Fake kernels for one backend's three output-saving BN+act ops (``prefix + "forward"``...)."""

    def channel_vector(x):
        return x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))

    @torch.library.register_fake(prefix + "forward")
    def _(x, mean, scale, shift, residual, branch, name, params):
        return torch.empty_like(x), x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)

    @torch.library.register_fake(prefix + "backward_reduce")
    def _(grad_out, y, mask, scale, shift, residual, table, name, params):
        # the CPU kernels keep the recovered z for backward_elemt, the CUDA ones recompute it
        compute = compute_dtype(y.dtype)
        z = (torch.empty_like(y, dtype=compute) if y.device.type == "cpu"
             else y.new_empty(0, dtype=compute))
        return channel_vector(y), channel_vector(y), z

    @torch.library.register_fake(prefix + "backward_elemt")
    def _(grad_out, y, mask, z, scale, shift, residual, coef_xmu, coef_const, table, name,
          params):
        grad_residual = torch.empty_like(y) if residual is not None else y.new_empty(0)
        return torch.empty_like(y), grad_residual


if MODULE is not None:
    register_bn_act_output_fakes("mishkit::bn_act_output_")
    KERNELS = KERNELS._replace(bn_act_output=BnActOutputKernels(
        torch.ops.mishkit.bn_act_output_forward, torch.ops.mishkit.bn_act_output_backward_reduce,
        torch.ops.mishkit.bn_act_output_backward_elemt))
