"""The dispatch core of the activation API: validate, choose a backend, call its kernel set.

Every compiled backend exposes three ops with one schema (the C++ extension as
``act_forward / act_forward_ / act_backward``, Triton as ``triton_act_forward / ...``)::

    act_forward(Tensor x, str name, float[] params) -> Tensor
    act_forward_(Tensor(a!) x, str name, float[] params) -> Tensor(a!)
    act_backward(Tensor grad_out, Tensor x, str name, float[] params) -> Tensor

Their fakes and autograd are registered by the backends themselves (:mod:`mishkit.backends`);
the ``torch`` backend is an autograd.Function with the same save-only-x contract.

A plain eager call (an exact tensor, no ``__torch_function__`` mode, the extension's backend for its
device) goes straight to ``mishkit._C.act_forward_eager``, the same op without ``torch.ops``'
generic argument matching; it returns None for anything else, which the checks below handle.

Under ``torch.compile``, ``backend="auto"`` runs :mod:`mishkit.backends.lowering` instead (the
same formulas as pointwise torch ops, which Inductor fuses and recomputes); a forced backend keeps
its kernel there too.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import backends
from ._checks import check_input
from .backends import lowering
from .backends.extension import EAGER_FORWARD as _EAGER_FORWARD
from .registry import ActivationSpec


def backward(grad_out, x, name: str, params, backend: str) -> torch.Tensor:
    """``grad_out * f'(x)`` with the fused backward of an already chosen ``backend``."""
    return backends.kernels(backend).act.backward(grad_out, x, name, list(params))


def lowered(backend: str) -> bool:
    """Whether ``backend`` runs as plain torch ops here: "auto" while torch.compile traces."""
    return backend == "auto" and torch.compiler.is_compiling()


def _unpack_dual(x: torch.Tensor) -> forward_ad.UnpackedDualTensor:
    """``(primal, tangent)`` of ``x``; tangent None without one, and under torch.compile (which
    traces forward AD itself)."""
    if torch.compiler.is_compiling():
        return forward_ad.UnpackedDualTensor(x, None)
    return forward_ad.unpack_dual(x)


def _forward_with_tangent(kernels, primal, tangent, name: str, params: list):
    """Forward-mode AD for backends whose ops have no rule for it (torch's custom-op autograd
    has none): y's tangent is f'(x) * tangent, the backend's own backward op."""
    y = kernels.forward(primal, name, params)
    return forward_ad.make_dual(y, kernels.backward(tangent, primal, name, params))


def apply(x: torch.Tensor, spec: ActivationSpec, params: tuple, inplace: bool, backend: str):
    """Run activation ``spec`` on ``x`` with the chosen backend (the functional API's core)."""
    if _EAGER_FORWARD is not None and not torch.compiler.is_compiling():
        y = _EAGER_FORWARD(x, spec.name, params, inplace, backend)
        if y is not None:  # the extension took the plain call; anything else is checked below
            return y
    check_input(x, spec.name)
    backends.check_backend_name(backend, f"mishkit.{spec.name}")
    if inplace and torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"mishkit.{spec.name}(inplace=True): autograd needs the input for backward, and "
            "the in-place op would overwrite it. Use inplace=False, or run under "
            "torch.no_grad() / torch.inference_mode() for inference."
        )
    if inplace and _unpack_dual(x).tangent is not None:
        raise RuntimeError(
            f"mishkit.{spec.name}(inplace=True): x has a forward-mode tangent, and the in-place "
            "activation would overwrite the x that f'(x) * tangent needs; use inplace=False")
    params = list(params)
    if lowered(backend):
        y = lowering.activation(x, spec.name, params)
        return x.copy_(y) if inplace else y
    chosen = backends.choose(backend, x.device, spec.name)
    kernels = backends.kernels(chosen).act
    if chosen not in backends.FORWARD_AD_IN_KERNELS:
        primal, tangent = _unpack_dual(x)
        if tangent is not None:
            return _forward_with_tangent(kernels, primal, tangent, spec.name, params)
    if inplace:
        if torch.compiler.is_compiling():
            # compile can't functionalize a custom op returning an alias of its input: write back
            return x.copy_(kernels.forward(x, spec.name, params))
        return kernels.forward_(x, spec.name, params)
    return kernels.forward(x, spec.name, params)
