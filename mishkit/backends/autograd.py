"""Autograd for a compiled backend's activation op pair, shared by the extension and Triton, and
the autograd.Function of the pure-torch activations (the reference backend, the compile lowering).

Forward saves only ``x``; backward is one call of the backend's fused backward op; double
backward reuses that op for d/d(grad_out) and the registry's differentiable derivative formula
for d/dx. Registered with ``torch.library.register_autograd`` so the ops stay real torch ops
(opcheck, torch.compile) rather than Python autograd.Functions. The C++ extension's forward
autograd is C++ (``csrc/act_autograd.cpp``, for its per-call cost); its double backward is
:func:`register_double_backward`.

In-place ops (``Tensor(a!) x -> Tensor(a!)``) get the two device-independent kernels every torch
in-place op has (:func:`register_inplace_kernels`; the C++ ``act_forward_`` has them in
``csrc/act_autograd.cpp``): Autograd refuses a tensor autograd tracks, ADInplaceOrView bumps the
version counter so a graph that saved the overwritten tensor raises in backward.
"""

from __future__ import annotations

import torch

from .._checks import compute_dtype
from ..registry import ActivationSpec, get_spec


def second_derivative(spec: ActivationSpec, x: torch.Tensor, params) -> torch.Tensor:
    """f''(x) by autograd through the registry's derivative formula (for double backward)."""
    with torch.enable_grad():
        xd = x.detach().to(compute_dtype(x.dtype)).requires_grad_(True)
        d1 = spec.derivative(xd, **spec.kwargs(tuple(params)))
        if not d1.requires_grad:  # piecewise-linear: f'' is 0 almost everywhere
            return torch.zeros_like(x)
        (d2,) = torch.autograd.grad(d1, xd, torch.ones_like(d1))
    return d2.to(x.dtype)


def save_input_function(name: str, forward_fn, backward_fn) -> type[torch.autograd.Function]:
    """An autograd.Function ``forward_fn(x, name, params)`` that saves only ``x`` and whose
    backward is ``backward_fn(grad_out, x, name, params)`` (the pure-torch backends' contract)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(x, name, params):
            return forward_fn(x, name, params)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, name, params = inputs
            ctx.save_for_backward(x)
            ctx.name, ctx.params = name, params

        @staticmethod
        def backward(ctx, grad_out):
            (x,) = ctx.saved_tensors
            return backward_fn(grad_out, x, ctx.name, ctx.params), None, None

    Function.__name__ = Function.__qualname__ = name
    return Function


def register_op_autograd(forward_op: str, backward_op: str, backward_fn) -> None:
    """Attach autograd to a backend's ``forward_op``/``backward_op`` pair (qualified names)."""

    def setup_forward(ctx, inputs, output):
        x, name, params = inputs
        ctx.save_for_backward(x)
        ctx.name, ctx.params = name, params

    def forward_backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return backward_fn(grad_out, x, ctx.name, ctx.params), None, None

    torch.library.register_autograd(forward_op, forward_backward, setup_context=setup_forward)
    register_double_backward(backward_op, backward_fn)


def register_double_backward(backward_op: str, backward_fn) -> None:
    """Autograd of ``backward_op`` (grad_out, x -> grad_out * f'(x)): ``backward_fn`` for
    d/d(grad_out), f'' from the registry's derivative formula for d/dx."""

    def setup_backward(ctx, inputs, output):
        grad_out, x, name, params = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.name, ctx.params = name, params

    def backward_backward(ctx, grad_grad):
        grad_out, x = ctx.saved_tensors
        spec = get_spec(ctx.name)
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = backward_fn(grad_grad, x, ctx.name, ctx.params)
        if ctx.needs_input_grad[1]:
            d_x = grad_grad * grad_out * second_derivative(spec, x, ctx.params)
        return d_grad_out, d_x, None, None

    torch.library.register_autograd(backward_op, backward_backward, setup_context=setup_backward)


def inplace_requires_grad_message(op: str, name: str, out_of_place: str) -> str:
    return (f"{op}({name}): x requires grad, and the in-place activation would overwrite the "
            f"input its backward needs; use {out_of_place}, or run under torch.no_grad()")


def register_inplace_kernels(lib: torch.library.Library, op_name: str, out_of_place: str) -> None:
    """Autograd and ADInplaceOrView kernels of the in-place op ``lib.ns::op_name``."""
    qualname = f"{lib.ns}::{op_name}"
    op = getattr(getattr(torch.ops, lib.ns), op_name).default

    def autograd_kernel(keyset, x, name, params):
        # f'(x) needs the x this op overwrites; no activation can recover x from f(x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(inplace_requires_grad_message(qualname, name, out_of_place))
        return op.redispatch(keyset & torch._C._after_autograd_keyset, x, name, params)

    def version_kernel(keyset, x, name, params):
        # first, as the C++ op does: nothing is written when it raises
        if x.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{qualname}: in-place update to an inference tensor outside "
                               "InferenceMode is not allowed (as for torch's in-place ops)")
        torch.autograd.graph.increment_version(x)
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, x, name, params)

    lib.impl(op_name, autograd_kernel, "Autograd", with_keyset=True)
    lib.impl(op_name, version_kernel, "ADInplaceOrView", with_keyset=True)
