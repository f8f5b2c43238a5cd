"""Module-level conversion: scope, what ``replace`` covers, and swapping activation children.

Activations are replaced through their parent's slot (keeping hooks and the train/eval flag;
activations hold no tensors, so device and dtype are untouched). Every activation site that is
not replaced is reported with its path and the reason (:mod:`.mappings` says what a site is).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from ..backends.inversion import invertibility_error
from ..batchnorm import BatchNormAct2d
from ..batchnorm.modules import HOOK_DICTS
from ..nn import Activation, get_activation
from ..registry import get_spec
from . import runtime
from .mappings import KNOWN_ACTIVATIONS, Known, identify


class Scope:
    """include / exclude fnmatch globs on module paths."""

    def __init__(self, include, exclude):
        self.include, self.exclude = _patterns(include, "include"), _patterns(exclude, "exclude")

    def __call__(self, path: str) -> bool:
        if self.include is not None and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(path, p) for p in self.exclude or ())


def _patterns(value, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"convert: {what} must be glob strings, got {value!r}")
    return value


OUTSIDE_SCOPE = "outside include/exclude"


class Replace:
    """What ``convert(replace=...)`` covers: nn.Module classes (and their subclasses), qualified
    class names (``"transformers.activations.GELUActivation"``), and ``KNOWN_ACTIVATIONS`` for
    every registered third-party activation class."""

    def __init__(self, value):
        items = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (
            value,)
        classes, names, known = [], set(), False
        for item in items:
            if item is KNOWN_ACTIVATIONS:
                known = True
            elif isinstance(item, type) and issubclass(item, nn.Module):
                classes.append(item)
            elif isinstance(item, str) and "." in item.strip("."):
                names.add(item)
            else:
                raise TypeError(
                    "convert: replace must hold nn.Module classes, qualified class names "
                    "('package.module.Class') or mishkit.conversion.KNOWN_ACTIVATIONS, "
                    f"got {item!r}"
                )
        self.classes, self.names, self.known = tuple(classes), frozenset(names), known

    def covers_class(self, cls: type) -> bool:
        return issubclass(cls, self.classes)

    def covers_module(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes)

    def covers_known(self, known: Known) -> bool:
        third_party = not known.qualname.startswith("torch.")
        return (self.known and third_party) or known.qualname in self.names


def children(model: nn.Module):
    """(path, parent, name, child) for every child slot; a shared module appears at each slot."""
    for parent_path, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield join(parent_path, name), parent, name, child


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    for attr in HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))  # shared: existing handles still remove
    new.train(old.training)
    return new


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def has_hooks(module: nn.Module) -> bool:
    """User hooks (not the run-time route's own) that a fusion would bypass. The other entries
    of HOOK_DICTS are flags of these (``with_kwargs``, ``always_called``)."""
    return any(not runtime.is_own_hook(hook)
               for attr in _HOOKS for hook in getattr(module, attr, {}).values())


# leaky_relu(z, 1) == z exactly: a BatchNormAct2d with it is a plain BatchNorm (saving its output)
IDENTITY_ACT = ("leaky_relu", (1.0,))


def retarget_fused(model, name, bound, backend, scope, result) -> None:
    """A fused BN+act is one of mishkit's own activation modules: give it the new activation
    (not a shortcut norm's identity; a saves="output" module that cannot invert the new one
    saves its input from then on)."""
    for path, module in model.named_modules():
        if not isinstance(module, BatchNormAct2d) or not scope(path):
            continue
        if (module.activation, module.activation_params) == IDENTITY_ACT:
            continue
        if (module.activation, module.activation_params, module.backend) == (name, bound, backend):
            continue
        old = repr(module)
        module.activation, module.activation_params, module.backend = name, bound, backend
        if module.saves == "output" and (reason := invertibility_error(name, bound)) is not None:
            module.saves = "input"
            result.skipped.append((path, f"{name} cannot be inverted ({reason}): now "
                                         "saves='input'"))
        result.replaced.append((path, old, repr(module), "fused_bn"))


def swap_modules(model, replace: Replace, name, bound, backend, scope, result) -> None:
    if replace.covers_class(Activation):
        retarget_fused(model, name, bound, backend, scope, result)
    made: dict[int, nn.Module] = {}  # a module shared by several parents stays shared
    for path, parent, slot, child in list(children(model)):
        described = type(child).__name__
        if not replace.covers_module(child):
            site = None if isinstance(child, Activation) else identify(child)
            if site is None or site.kind == "gate":
                continue
            reason = _not_replaced(site, replace) if scope(path) else OUTSIDE_SCOPE
            if reason is not None:
                result.skipped.append((path, reason))
                continue
            described = f"{described} ({site.known.describe()})"
        elif not scope(path):
            result.skipped.append((path, OUTSIDE_SCOPE))
            continue
        inplace = bool(getattr(child, "inplace", False))
        new = made.get(id(child))
        if new is None:
            new = get_activation(name, **get_spec(name).kwargs(bound), inplace=inplace,
                                 backend=backend)
            if new.same_as(child) and child.inplace == inplace:
                result.skipped.append((path, f"already {type(child).__name__}"))
                continue
            new = made[id(child)] = adopt(new, child)
        setattr(parent, slot, new)
        result.replaced.append((path, described, repr(new), "module"))


def _not_replaced(site, replace: Replace) -> str | None:
    """Why an identified activation site is not replaced, or None when it is."""
    if site.kind == "unknown":
        return (f"{site.qualname} looks like an activation, but mishkit does not know it: "
                f"mishkit.conversion.register_activation({site.qualname!r}, ...) maps it")
    known = site.known
    if known.reason is not None:
        return f"{known.qualname}: {known.reason}"
    if not replace.covers_known(known):
        return f"{known.qualname} ({known.describe()}) is not in replace"
    return None
