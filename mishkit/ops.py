"""The Python side of the ``torch.ops.mishkit`` activation ops.

Every compiled backend exposes three ops with one schema (the C++ extension as
``act_forward / act_forward_ / act_backward``, Triton as ``triton_act_forward / ...``)::

    act_forward(Tensor x, str name, float[] params) -> Tensor
    act_forward_(Tensor(a!) x, str name, float[] params) -> Tensor(a!)
    act_backward(Tensor grad_out, Tensor x, str name, float[] params) -> Tensor

This module gives them fake (meta) kernels and autograd: forward saves only ``x``; backward is one
fused kernel call; double backward reuses the backward kernel for d/d(grad_out) and the
registry's differentiable derivative formula for d/dx. The ``torch`` backend is a plain
``autograd.Function`` over the registry formulas with the same save-only-x contract.
"""

from __future__ import annotations

import torch

from . import backends
from .registry import ActivationSpec, get_spec

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def second_derivative(spec: ActivationSpec, x: torch.Tensor, params) -> torch.Tensor:
    """f''(x) by autograd through the registry's derivative formula (for double backward)."""
    with torch.enable_grad():
        xd = x.detach().to(_compute_dtype(x.dtype)).requires_grad_(True)
        d1 = spec.derivative(xd, **spec.kwargs(tuple(params)))
        if not d1.requires_grad:  # piecewise-linear: f'' is 0 almost everywhere
            return torch.zeros_like(x)
        (d2,) = torch.autograd.grad(d1, xd, torch.ones_like(d1))
    return d2.to(x.dtype)


def register_op_autograd(forward_op: str, backward_op: str, backward_fn) -> None:
    """Attach autograd to a backend's ``forward_op``/``backward_op`` pair (qualified names)."""

    def setup_forward(ctx, inputs, output):
        x, name, params = inputs
        ctx.save_for_backward(x)
        ctx.name, ctx.params = name, params

    def forward_backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return backward_fn(grad_out, x, ctx.name, ctx.params), None, None

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

    torch.library.register_autograd(forward_op, forward_backward, setup_context=setup_forward)
    torch.library.register_autograd(backward_op, backward_backward, setup_context=setup_backward)


def _register_extension_ops() -> None:
    module, _ = backends.extension()
    if module is None:
        return

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

    register_op_autograd(
        "mishkit::act_forward", "mishkit::act_backward", torch.ops.mishkit.act_backward
    )


_register_extension_ops()


class ReferenceActivation(torch.autograd.Function):
    """Pure-torch backend: registry formulas, saves only ``x``; double backward via autograd."""

    @staticmethod
    def forward(x, name, params):
        spec = get_spec(name)
        return spec.reference(x.to(_compute_dtype(x.dtype)), **spec.kwargs(params)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, name, params = inputs
        ctx.save_for_backward(x)
        ctx.name, ctx.params = name, params

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return reference_backward(grad_out, x, ctx.name, ctx.params), None, None


def reference_backward(grad_out, x, name, params):
    spec = get_spec(name)
    compute = _compute_dtype(x.dtype)
    d = spec.derivative(x.to(compute), **spec.kwargs(tuple(params)))
    return (grad_out.to(compute) * d).to(x.dtype)


def _triton_ops():
    from . import triton_kernels  # registers torch.ops.mishkit.triton_act_*

    return triton_kernels


# resolved backend -> its fused backward: (grad_out, x, name, params) -> grad_out * f'(x)
_BACKWARD = {
    "torch": lambda: reference_backward,
    "cpu": lambda: torch.ops.mishkit.act_backward,
    "cuda": lambda: torch.ops.mishkit.act_backward,
    "triton": lambda: _triton_ops().backward,
}


def backward(grad_out, x, name: str, params, backend: str) -> torch.Tensor:
    """``grad_out * f'(x)`` with the fused backward of an already chosen ``backend``."""
    return _BACKWARD[backend]()(grad_out, x, name, list(params))


def check_input(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mishkit.{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"mishkit.{name}: unsupported dtype {x.dtype}; expected float32, float64, float16 "
            "or bfloat16"
        )


def apply(x: torch.Tensor, spec: ActivationSpec, params: tuple, inplace: bool, backend: str):
    """Run activation ``spec`` on ``x`` with the chosen backend (the functional API's core)."""
    check_input(x, spec.name)
    chosen = backends.choose(backend, x.device, spec.name)
    params = list(params)
    if inplace:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"mishkit.{spec.name}(inplace=True): autograd needs the input for backward, and "
                "the in-place op would overwrite it. Use inplace=False, or run under "
                "torch.no_grad() / torch.inference_mode() for inference."
            )
        if chosen == "torch" or torch.compiler.is_compiling():
            # compile can't functionalize a custom op returning an alias of its input: write back
            return x.copy_(apply(x, spec, tuple(params), False, chosen))
        if chosen == "triton":
            return _triton_ops().forward_(x, spec.name, params)
        return torch.ops.mishkit.act_forward_(x, spec.name, params)
    if chosen == "torch":
        return ReferenceActivation.apply(x, spec.name, tuple(params))
    if chosen == "triton":
        return _triton_ops().forward(x, spec.name, params)
    return torch.ops.mishkit.act_forward(x, spec.name, params)
