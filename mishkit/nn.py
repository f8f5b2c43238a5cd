"""``mishkit.nn.<Name>`` activation modules, generated from the registry, and the torch mapping.

Every registered activation gets a module class named ``spec.module_name`` (``Mish``, ``SiLU``,
``GELUTanh``, ...). Where torch has a counterpart the constructor takes the same arguments in the
same order (``LeakyReLU(negative_slope=0.01, inplace=False)``), plus a keyword-only ``backend``, so
a mishkit module is a drop-in. ``GELU(approximate="tanh")`` computes ``gelu_tanh``, as torch's does.

``inplace=True`` is honoured only when autograd does not need the input: torch's in-place ReLU can
overwrite its input because its backward reads the *output*, but mishkit's fused backward reads
the *input* (that is what lets it save one tensor for any activation). So while the input
requires grad the module computes out of place; under ``no_grad``/``inference_mode`` it writes in
place and saves the allocation.

:data:`TORCH_EQUIVALENTS` is the one table between torch activation modules and registry names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .batchnorm import BatchNormAct2d, SyncBatchNormAct2d
from .registry import ACTIVATIONS, ActivationSpec, get_spec


class Activation(nn.Module):
    """Base of every ``mishkit.nn`` activation module: one registry entry, bound parameters."""

    spec: ActivationSpec  # set per generated subclass (GELU picks it per instance)

    def __init__(self, *params, inplace: bool = False, backend: str = "auto", **kwparams):
        super().__init__()
        if not isinstance(inplace, bool):
            raise TypeError(f"{type(self).__name__}: inplace must be a bool, got {inplace!r}")
        if not isinstance(backend, str):
            raise TypeError(f"{type(self).__name__}: backend must be a string, got {backend!r}")
        self.params: tuple[float, ...] = self.spec.bind(params, kwparams)
        self.inplace = inplace
        self.backend = backend

    @property
    def activation(self) -> str:
        return self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # see the module docstring: the fused backward needs the input, so no in-place with grad
        inplace = self.inplace and not (torch.is_grad_enabled() and x.requires_grad)
        return ops.apply(x, self.spec, self.params, inplace, self.backend)

    def same_as(self, other: nn.Module) -> bool:
        """True when ``other`` computes exactly this activation with the same settings."""
        return (
            isinstance(other, Activation)
            and other.spec.name == self.spec.name
            and other.params == self.params
            and other.backend == self.backend
        )

    def extra_repr(self) -> str:
        parts = [f"{key}={value:g}" for key, value in self.spec.kwargs(self.params).items()]
        if self.inplace:
            parts.append("inplace=True")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _make_module(spec: ActivationSpec) -> type[Activation]:
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for key, default in spec.params.items()
    ]
    parameters += [
        inspect.Parameter("inplace", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False),
        inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
    ]
    signature = inspect.Signature(parameters)

    def __init__(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{spec.module_name}{signature}: {exc}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        inplace, backend = values.pop("inplace"), values.pop("backend")
        Activation.__init__(self, inplace=inplace, backend=backend, **values)

    __init__.__signature__ = signature
    doc = f"{spec.name}(x) = {spec.formula}. Fused kernels; saves only the input for backward."
    if spec.torch_module:
        doc += f" Drop-in for torch.nn.{spec.torch_module}."
    namespace = {"__init__": __init__, "spec": spec, "__doc__": doc, "__module__": __name__}
    for index, key in enumerate(spec.params):  # m.negative_slope etc., as on the torch module
        namespace[key] = property(lambda self, index=index: self.params[index])
    return type(spec.module_name, (Activation,), namespace)


for _spec in ACTIVATIONS.values():
    globals()[_spec.module_name] = _make_module(_spec)

_GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


class GELU(Activation):
    """Drop-in for ``torch.nn.GELU(approximate="none" | "tanh")``; "tanh" computes gelu_tanh.

    ``inplace`` (keyword-only; torch's GELU has none) works as on every mishkit module.
    """

    spec = ACTIVATIONS["gelu"]

    def __init__(self, approximate: str = "none", *, inplace: bool = False,
                 backend: str = "auto"):
        if approximate not in _GELU_APPROXIMATIONS:
            raise ValueError(
                f"GELU: approximate must be one of {list(_GELU_APPROXIMATIONS)}, "
                f"got {approximate!r}"
            )
        self.spec = ACTIVATIONS[_GELU_APPROXIMATIONS[approximate]]
        self.approximate = approximate
        super().__init__(inplace=inplace, backend=backend)

    def extra_repr(self) -> str:
        parts = [f"approximate={self.approximate!r}"]
        if self.inplace:
            parts.append("inplace=True")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


MODULES: dict[str, type[Activation]] = {
    name: globals()[spec.module_name] for name, spec in ACTIVATIONS.items()
}
MODULES["gelu"] = GELU


def get_activation(name: str, **params) -> Activation:
    """Build the module for activation ``name`` (or an alias): ``get_activation("elu", alpha=2)``.

    ``params`` may hold the activation's parameters, ``inplace`` and ``backend``. An unknown name
    raises ValueError listing the valid names and aliases.
    """
    spec = get_spec(name)
    if spec.name == "gelu":  # the GELU class takes approximate=, not the registry's params
        return GELU(**params)
    return MODULES[spec.name](**params)


# -- the one table between torch activation modules and registry names -----------------------------


@dataclass(frozen=True)
class TorchEquivalent:
    """A torch activation module and the registry activation it computes."""

    name: str  # registry name
    torch_class: type[nn.Module]
    read: Callable[[nn.Module], dict]  # registry params from a torch module instance
    build: Callable[[dict, bool], nn.Module]  # torch module from registry params and inplace
    matches: Callable[[nn.Module], bool] = lambda module: True


def _no_params(module):
    return {}


# fmt: off
TORCH_EQUIVALENTS: tuple[TorchEquivalent, ...] = (
    TorchEquivalent("relu", nn.ReLU, _no_params, lambda p, inplace: nn.ReLU(inplace)),
    TorchEquivalent("leaky_relu", nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope},
                    lambda p, inplace: nn.LeakyReLU(p["negative_slope"], inplace)),
    TorchEquivalent("elu", nn.ELU, lambda m: {"alpha": m.alpha},
                    lambda p, inplace: nn.ELU(p["alpha"], inplace)),
    TorchEquivalent("selu", nn.SELU, _no_params, lambda p, inplace: nn.SELU(inplace)),
    TorchEquivalent("silu", nn.SiLU, _no_params, lambda p, inplace: nn.SiLU(inplace)),
    TorchEquivalent("mish", nn.Mish, _no_params, lambda p, inplace: nn.Mish(inplace)),
    TorchEquivalent("hardswish", nn.Hardswish, _no_params,
                    lambda p, inplace: nn.Hardswish(inplace)),
    TorchEquivalent("gelu", nn.GELU, _no_params, lambda p, inplace: nn.GELU("none"),
                    matches=lambda m: m.approximate == "none"),
    TorchEquivalent("gelu_tanh", nn.GELU, _no_params, lambda p, inplace: nn.GELU("tanh"),
                    matches=lambda m: m.approximate == "tanh"),
    TorchEquivalent("softplus", nn.Softplus,
                    lambda m: {"beta": float(m.beta), "threshold": float(m.threshold)},
                    lambda p, inplace: nn.Softplus(p["beta"], p["threshold"])),
)
# fmt: on
_BY_NAME = {row.name: row for row in TORCH_EQUIVALENTS}


def from_torch(module: nn.Module) -> tuple[str, tuple[float, ...]] | None:
    """``(registry name, params)`` that a torch (or mishkit) activation module computes, or None.

    None means the registry has no exact equivalent (e.g. ``nn.ReLU6``).
    """
    if isinstance(module, Activation):
        return module.spec.name, module.params
    for row in TORCH_EQUIVALENTS:
        if type(module) is row.torch_class and row.matches(module):
            spec = ACTIVATIONS[row.name]
            return row.name, spec.bind((), row.read(module))
    return None


def to_torch(name: str, params: tuple[float, ...] = (), inplace: bool = False) -> nn.Module:
    """The plain torch module computing registry activation ``name``; ValueError if none exists."""
    spec = get_spec(name)
    row = _BY_NAME.get(spec.name)
    if row is None:
        with_torch = sorted(_BY_NAME)
        raise ValueError(
            f"activation {spec.name!r} has no torch.nn equivalent to convert back to; "
            f"these do: {', '.join(with_torch)}"
        )
    return row.build(spec.kwargs(tuple(params) or spec.bind((), {})), inplace)


def is_norm(module: nn.Module) -> bool:
    """True for batch norms, fused or not (e.g. to exempt them from weight decay)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormAct2d))


__all__ = [
    "MODULES",
    "TORCH_EQUIVALENTS",
    "Activation",
    "BatchNormAct2d",
    "SyncBatchNormAct2d",
    "TorchEquivalent",
    "from_torch",
    "get_activation",
    "is_norm",
    "to_torch",
    *(spec.module_name for spec in ACTIVATIONS.values()),
]
