"""Which modules are activation sites: torch's, Hugging Face's, timm's and the user's own classes.

Third-party classes are matched by *qualified name* (``type(m).__module__ + "." +
type(m).__qualname__``), so mishkit never imports transformers or timm. A subclass matches its
registered base only while it keeps the base's ``forward``. Every leaf module falls in one group:

- **activation**: an elementwise nonlinearity at an activation site; :func:`mishkit.convert`
  replaces it whole by the target (``activation`` says which registry formula it computes, or
  None where the registry has none, e.g. ``relu(x)**2``). With ``reason`` set it is known but
  never replaced (learned parameters the replacement would drop), and the report says why.
- **gate**: a squashing function (sigmoid, tanh, hard-sigmoid, softmax, identity): never
  converted, traced or reported.
- **unknown activation**: a leaf whose class name reads like an activation (``...GELU``,
  ``...ReLU``, ``...Activation``) but is registered nowhere; never converted or traced, always
  reported, so a missing mapping cannot go unnoticed.

:func:`register_activation` adds or overrides an entry; :func:`identify` tells what mishkit
makes of a module. Known *functions* (timm's ``hard_swish``, ``hard_sigmoid`` ...) get the same
treatment in traced code: they stay one call, never rewritten inside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..registry import get_spec

__all__ = [
    "KNOWN_ACTIVATIONS",
    "Known",
    "Site",
    "identify",
    "known_activations",
    "known_function",
    "qualified_name",
    "register_activation",
]


@dataclass(frozen=True)
class Known:
    """A registered activation or gate class (or function), by qualified name."""

    qualname: str
    activation: str | None = None  # registry name of the formula it computes, if any
    formula: str = ""  # what it computes, for reports, where no registry name says it
    reason: str | None = None  # set: known, but never replaced (why)
    gate: bool = False

    def describe(self) -> str:
        return self.activation or self.formula or "?"


@dataclass(frozen=True)
class Site:
    """What :func:`identify` makes of one module."""

    kind: str  # "activation" | "gate" | "unknown"
    qualname: str
    known: Known | None = None

    @property
    def convertible(self) -> bool:
        return self.kind == "activation" and self.known is not None and self.known.reason is None


class _KnownActivations:
    """Stands in ``convert(replace=...)`` for every registered third-party activation class."""

    def __repr__(self) -> str:
        return "mishkit.conversion.KNOWN_ACTIVATIONS"

    def __reduce__(self):
        return "KNOWN_ACTIVATIONS"


KNOWN_ACTIVATIONS = _KnownActivations()

_MODULES: dict[str, Known] = {}
_FUNCTIONS: dict[str, Known] = {}


def qualified_name(obj) -> str:
    """``module.qualname`` of a class or function (of a module instance: of its class)."""
    if isinstance(obj, nn.Module):
        obj = type(obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def register_activation(qualname: str, activation: str | None = None, *, formula: str = "",
                        reason: str | None = None, gate: bool = False,
                        function: bool = False) -> Known:
    """Tell :func:`mishkit.convert` what a third-party activation class (or function) is.

    ``qualname`` is ``"package.module.ClassName"`` as ``type(m).__module__`` and ``__qualname__``
    give it (``mishkit.conversion.qualified_name(m)`` prints it). ``activation``: the registry name
    of the formula it computes, if the registry has it; ``formula``: a description otherwise.
    ``reason``: never replace it, and report this. ``gate=True``: a squashing gate, left alone.
    ``function=True`` registers a plain function called in forward code (fx keeps it one call).
    A later registration of the same name replaces the earlier one::

        register_activation("mylib.layers.FancyGELU", "gelu_tanh")
        register_activation("mylib.layers.SquaredReLU", formula="relu(x)**2")
        register_activation("mylib.layers.LearnedAct", reason="learned slope per channel")
    """
    if not isinstance(qualname, str) or "." not in qualname.strip(". "):
        raise ValueError(
            f"register_activation: qualname must be 'package.module.ClassName', got {qualname!r}"
        )
    if activation is not None:
        activation = get_spec(activation).name  # ValueError lists the valid names
    if gate and (activation is not None or reason is not None):
        raise ValueError("register_activation: a gate has no activation and no reason")
    known = Known(qualname, activation, formula, reason, gate)
    (_FUNCTIONS if function else _MODULES)[qualname] = known
    return known


def known_activations() -> dict[str, Known]:
    """A copy of the registered third-party classes, by qualified name."""
    return dict(_MODULES)


def known_function(fn) -> Known | None:
    """The registration of a plain function called in forward code, if any."""
    try:
        return _FUNCTIONS.get(qualified_name(fn))
    except Exception:  # exotic callables without names
        return None


# torch's activation classes (those outside the default ``replace`` are reported), and its gates
_TORCH_SITES: dict[type, Known] = {
    cls: Known(qualified_name(cls), *rest) for cls, *rest in [
        (nn.ReLU, "relu"), (nn.ReLU6, None, "relu6(x)"), (nn.LeakyReLU, "leaky_relu"),
        (nn.SiLU, "silu"), (nn.GELU, None, "gelu (erf or tanh form)"), (nn.ELU, "elu"),
        (nn.Hardswish, "hardswish"), (nn.Mish, "mish"),
        (nn.SELU, "selu"), (nn.CELU, None, "celu(x, alpha)"), (nn.Softplus, "softplus"),
        (nn.Hardtanh, None, "clamp(x, min_val, max_val)"),
        (nn.RReLU, None, "randomized leaky relu",
         "its slope is random in training; no mishkit equivalent"),
        (nn.PReLU, None, "prelu(x, weight)",
         "it has a learned slope that the replacement would drop"),
    ]
}  # fmt: skip
_TORCH_GATES = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softmax, nn.LogSoftmax, nn.Softmin,
                nn.LogSigmoid, nn.Softsign, nn.GLU, nn.Identity)

# a leaf module whose class name reads like an activation
_ACTIVATION_NAME = re.compile(r"gelu|relu|elu|silu|swish|mish|softplus|activation|act$", re.I)


def identify(module: nn.Module) -> Site | None:
    """What ``module`` is for conversion, or None when it is no activation site or gate.

    mishkit's own modules give None (``replace`` covers them through ``Activation``).
    """
    cls = type(module)
    for base in cls.__mro__:
        if base is nn.Module:
            break
        known = _MODULES.get(qualified_name(base))
        if known is not None and (base is cls or cls.forward is base.forward):
            return Site("gate" if known.gate else "activation", known.qualname, known)
    for base, known in _TORCH_SITES.items():
        if cls is base:
            return Site("activation", known.qualname, known)
    if cls in _TORCH_GATES:
        return Site("gate", qualified_name(cls))
    if not module._modules and _ACTIVATION_NAME.search(cls.__name__):
        return Site("unknown", qualified_name(cls))
    return None


# -- Hugging Face transformers (transformers.activations; ACT2CLS) --------------------------------
_HF = "transformers.activations."
_TIMM = "timm.layers.activations."
_TIMM_ME = "timm.layers.activations_me."
# fmt: off
for _name, _activation, _formula in [
    ("GELUActivation", "gelu", ""),                       # "gelu", "gelu_python"
    ("NewGELUActivation", "gelu_tanh", ""),               # "gelu_new"
    ("GELUTanh", "gelu_tanh", ""),                        # "gelu_pytorch_tanh" (PytorchGELUTanh)
    ("PytorchGELUTanh", "gelu_tanh", ""),                 # the class name in transformers 4.x
    # sqrt(2/pi) written as 0.7978845608: 3e-12 relative off gelu_tanh, far below float64 noise
    ("FastGELUActivation", "gelu_tanh", ""),              # "gelu_fast"
    ("AccurateGELUActivation", "gelu_tanh", ""),          # "gelu_accurate"
    ("QuickGELUActivation", "quick_gelu", ""),            # "quick_gelu" (CLIP)
    ("SiLUActivation", "silu", ""),                       # "silu"
    ("MishActivation", "mish", ""),                       # "mish"
    ("ClippedGELUActivation", None, "clip(gelu(x), min, max)"),  # "gelu_10"
    ("ReLUSquaredActivation", None, "relu(x)**2"),       # "relu2"
]:
    register_activation(_HF + _name, _activation, formula=_formula)
register_activation(_HF + "XIELUActivation", formula="xielu(x; alpha_p, alpha_n)",
                    reason="it has learned parameters that the replacement would drop")
for _name in ("LinearActivation", "LaplaceActivation", "SqrtSoftplusActivation"):
    register_activation(_HF + _name, gate=True)  # identity; attention / router scoring functions

# -- timm (timm.layers.activations, activations_me; the same names as functions) ------------------
for _name, _function, _activation in [
    ("Swish", "swish", "silu"), ("Mish", "mish", "mish"), ("GELU", "gelu", "gelu"),
    ("GELUTanh", "gelu_tanh", "gelu_tanh"), ("QuickGELU", "quick_gelu", "quick_gelu"),
    ("HardSwish", "hard_swish", "hardswish"), ("HardMish", "hard_mish", "hardmish"),
]:
    register_activation(_TIMM + _name, _activation)
    register_activation(_TIMM + _function, _activation, function=True)
for _name, _function in [("Sigmoid", "sigmoid"), ("Tanh", "tanh"),
                         ("HardSigmoid", "hard_sigmoid")]:
    register_activation(_TIMM + _name, gate=True)
    register_activation(_TIMM + _function, gate=True, function=True)
register_activation(_TIMM + "PReLU", formula="prelu(x, weight)",
                    reason="it has a learned slope that the replacement would drop")
for _name, _function, _activation in [
    ("SwishMe", "swish_me", "silu"), ("MishMe", "mish_me", "mish"),
    ("HardSwishMe", "hard_swish_me", "hardswish"), ("HardMishMe", "hard_mish_me", "hardmish"),
]:
    register_activation(_TIMM_ME + _name, _activation)
    register_activation(_TIMM_ME + _function, _activation, function=True)
register_activation(_TIMM_ME + "HardSigmoidMe", gate=True)
register_activation(_TIMM_ME + "hard_sigmoid_me", gate=True, function=True)
# fmt: on

# timm's norm + activation modules (BN subclasses with .drop and .act children) -> fused BN+act
NORM_ACT: dict[str, str] = {
    "timm.layers.norm_act.BatchNormAct2d": "batchnorm",
    "timm.layers.norm_act.SyncBatchNormAct": "syncbatchnorm",
}
