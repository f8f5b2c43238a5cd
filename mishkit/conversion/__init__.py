"""``mishkit.convert(model, "mish", ...)``: swap a network's activations in place.

Module-level conversion replaces activation children through their parent (keeping hooks and the
train/eval flag; activations hold no tensors, so device and dtype are untouched). ``functional``
and ``fuse_bn`` also rewrite forward code with torch.fx (see :mod:`.fx`); every
graph is traced before any is changed, so an untraceable module leaves no half-rewritten model.
"""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import backends
from ..backends.inversion import invertibility_error
from ..batchnorm import BatchNormAct2d, SyncBatchNormAct2d
from ..batchnorm.modules import HOOK_DICTS
from ..nn import Activation, from_torch, get_activation, to_torch
from ..registry import get_spec
from . import fx
from .fx import UntraceableModuleError

DEFAULT_REPLACE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Mish, Activation,
)  # fmt: skip
NATIVE = "native"
__all__ = ["DEFAULT_REPLACE", "ConversionReport", "UntraceableModuleError", "convert"]


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    ``replaced``: (path, old type, new type, kind) with kind module / functional / fused_bn /
    fused_bn_add (``act(bn(x) + residual)``);
    ``skipped``: (path, reason).
    """

    replaced: list[tuple[str, str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"module": 0, "functional": 0, "fused_bn": 0, "fused_bn_add": 0,
                  "skipped": len(self.skipped)}
        for *_, kind in self.replaced:
            counts[kind] += 1
        return counts

    def __str__(self) -> str:
        lines = [f"{path or '<root>'}: {old} -> {new}" for path, old, new, _ in self.replaced]
        lines += [f"{path or '<root>'}: skipped ({reason})" for path, reason in self.skipped]
        lines.append(", ".join(f"{key}={value}" for key, value in self.counts.items()))
        return "\n".join(lines)


class _Scope:
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


def _resolve(activation, params: dict) -> tuple[str, tuple]:
    if isinstance(activation, dict):
        params = {**{k: v for k, v in activation.items() if k != "name"}, **params}
        if "name" not in activation:
            raise ValueError(f"convert: an activation dict needs a 'name' key, got {activation!r}")
        activation = activation["name"]
    if isinstance(activation, str) and activation.strip().lower() == NATIVE:
        if params:
            raise TypeError(f"convert: 'native' takes no parameters, got {sorted(params)}")
        return NATIVE, ()
    try:
        spec = get_spec(activation)
    except ValueError as exc:
        raise ValueError(f"{exc}; or 'native' to convert back to torch modules") from None
    return spec.name, spec.bind((), params)


def _validate(model, replace, backend) -> tuple[type, ...]:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "convert: got a TorchScript module; convert the eager nn.Module before scripting it"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_backend_name(backend, "convert")
    replace = tuple(replace) if isinstance(replace, Iterable) else (replace,)
    for cls in replace:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"convert: replace must hold nn.Module classes, got {cls!r}")
    return replace


def _children(model: nn.Module):
    """(path, parent, name, child) for every child slot; a shared module appears at each slot."""
    for parent_path, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield (f"{parent_path}.{name}" if parent_path else name), parent, name, child


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    for attr in HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))  # shared: existing handles still remove
    new.train(old.training)
    return new


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in HOOK_DICTS)


def convert(model: nn.Module, activation, *, replace=DEFAULT_REPLACE, include=None, exclude=None,
            functional: bool = False, fuse_bn: bool | str = False, backend: str = "auto",
            report: bool = False, **params):
    """Replace ``model``'s activations by ``activation`` (a registry name, alias, or ``"native"``).

    Parameters go as keywords or in a dict: ``convert(m, "leaky_relu", negative_slope=0.2)`` or
    ``convert(m, {"name": "leaky_relu", "negative_slope": 0.2})``. Works in place and returns the
    model, or ``(model, ConversionReport)`` with ``report=True``.

    - ``replace``: activation classes to swap (default :data:`DEFAULT_REPLACE`; ``Activation``
      stands for mishkit's own modules, fused norms and rewritten calls).
    - ``include`` / ``exclude``: fnmatch globs on module paths (``"decoder.*"``).
    - ``functional``: also rewrite ``F.relu(x)``, ``torch.relu``, ``x.relu()``, ``F.silu`` ... in
      forward code (torch.fx); an untraceable module raises UntraceableModuleError first.
    - ``fuse_bn``: BatchNorm2d / SyncBatchNorm followed by an activation -> (Sync)BatchNormAct2d,
      in Sequentials (the activation slot becomes Identity) and in traced forwards, where
      ``act(bn(x) + r)`` (a residual block's end) becomes ``bn(x, residual=r)`` too.
      ``fuse_bn="output"`` makes them ``saves="output"`` (they keep only their output for
      backward; pairs whose activation cannot be inverted keep ``saves="input"``, reported in
      ``skipped``); ``True`` / ``"input"`` save the input.
    - ``"native"``: mishkit modules, fused norms and rewritten calls back to plain torch.
    """
    replace = _validate(model, replace, backend)
    name, bound = _resolve(activation, params)
    saves = _fuse_saves(fuse_bn, name, bound)
    scope, result = _Scope(include, exclude), ConversionReport()
    if name == NATIVE:
        _to_native(model, scope, result)
    else:
        _swap_modules(model, replace, name, bound, backend, scope, result)
        if functional or fuse_bn:
            _rewrite_graphs(model, replace, name, bound, backend, scope, result, functional,
                            saves)
    if not result.replaced and not result.skipped:
        warnings.warn("mishkit.convert: the model has nothing to convert", UserWarning,
                      stacklevel=2)
    return (model, result) if report else model


def _retarget_fused(model, name, bound, backend, scope, result) -> None:
    """A fused BN+act is one of mishkit's own activation modules: give it the new activation."""
    for path, module in model.named_modules():
        if not isinstance(module, BatchNormAct2d) or not scope(path):
            continue
        if (module.activation, module.activation_params) == IDENTITY:  # a plain norm
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


def _swap_modules(model, replace, name, bound, backend, scope, result) -> None:
    if issubclass(Activation, replace):
        _retarget_fused(model, name, bound, backend, scope, result)
    made: dict[int, nn.Module] = {}  # a module shared by several parents stays shared
    for path, parent, slot, child in list(_children(model)):
        if not isinstance(child, replace):
            continue
        if not scope(path):
            result.skipped.append((path, "outside include/exclude"))
            continue
        inplace = bool(getattr(child, "inplace", False))
        new = made.get(id(child))
        if new is None:
            new = get_activation(name, **get_spec(name).kwargs(bound), inplace=inplace,
                                 backend=backend)
            if new.same_as(child) and child.inplace == inplace:
                result.skipped.append((path, f"already {type(child).__name__}"))
                continue
            new = made[id(child)] = _adopt(new, child)
        setattr(parent, slot, new)
        result.replaced.append((path, type(child).__name__, repr(new), "module"))


def _rewrite_graphs(model, replace, name, bound, backend, scope, result, functional, saves):
    fuse_bn = saves is not None
    graphs = {}
    for path, module in model.named_modules():
        if not scope(path) or not fx.traceable_kind(module):
            continue
        try:
            graphs[path] = (module, fx.module_graph(module, path))
        except fx.UntraceableModuleError as exc:
            if functional:  # nothing has been rewritten yet: fail whole
                raise
            result.skipped.append((path, f"BN fusion needs torch.fx: {exc}"))
    if fuse_bn:
        _fuse_sequentials(model, backend, scope, result, saves)
    for path, (module, graph) in graphs.items():
        changed = False
        if functional:
            done, skipped = fx.rewrite_functional(graph, module, replace, name, bound,
                                                          backend)
            for described, _ in done:
                result.replaced.append((f"{path}:{described}", described.split()[1],
                                        f"mishkit.functional.activation({name!r})", "functional"))
            result.skipped += [(f"{path}:{d}", reason) for d, reason in skipped]
            changed = bool(done)
        if fuse_bn and not isinstance(module, nn.Sequential):
            fuser = _Fuser(module, path, backend, result, saves)
            done, skipped = fx.fuse_bn(module, graph, fuser, _fusable)
            result.skipped += [(_join(path, t), reason) for t, reason in skipped]
            changed = changed or bool(done)
            if saves == "output":
                _shortcut_norms_save_output(module, graph, path, backend, scope, result)
        if changed:
            fx.install(module, graph)


# leaky_relu(z, 1) == z exactly: a BatchNormAct2d with it is a plain BatchNorm (saving its output)
IDENTITY = ("leaky_relu", (1.0,))


def _shortcut_norms_save_output(module, graph, path, backend, scope, result) -> None:
    """The plain BatchNorm ending a shortcut (``r = downsample(x)``) of a fused saves="output"
    block: the block saves ``r``; made to save its output too (an identity BatchNormAct2d), the
    norm no longer keeps its input, and the two share one tensor."""
    for node in graph.nodes:
        residual = node.kwargs.get("residual") if node.op == "call_module" else None
        if not isinstance(residual, torch.fx.Node) or residual.op != "call_module":
            continue
        block = module.get_submodule(node.target)
        if not (isinstance(block, BatchNormAct2d) and block.saves == "output"):
            continue
        target = residual.target
        shortcut = module.get_submodule(target)
        if type(shortcut) is nn.Sequential and len(shortcut):  # conv -> norm
            target = f"{target}.{len(shortcut) - 1}"
        norm = module.get_submodule(target)
        calls = sum(n.op == "call_module" and n.target == residual.target for n in graph.nodes)
        where = _join(path, target)
        if not _fusable(norm) or calls != 1 or len(residual.users) != 1 or _has_hooks(norm) \
                or not scope(where):
            continue
        fused = _fused(norm, *IDENTITY, backend, "output", where, result)
        module.set_submodule(target, fused)
        result.replaced.append((where, type(norm).__name__, repr(fused), "fused_bn"))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fusable(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def _fuse_saves(fuse_bn, name: str, params: tuple) -> str | None:
    """What fused norms save ("input" / "output"), or None without fusion."""
    if not (isinstance(fuse_bn, bool) or fuse_bn in ("input", "output")):
        raise ValueError(f"convert: fuse_bn must be True, False, 'input' or 'output', got "
                         f"{fuse_bn!r}")
    if not fuse_bn:
        return None
    saves = "output" if fuse_bn == "output" else "input"
    if saves == "output" and name != NATIVE:
        reason = invertibility_error(name, params)
        if reason is not None:
            raise ValueError(
                f"convert: fuse_bn='output' saves only the activation's output, but {name!r} "
                f"cannot be inverted ({reason}); use fuse_bn=True, which saves the BatchNorm input"
            )
    return saves


def _fused(bn: nn.Module, name: str, params: tuple, backend: str, saves: str, path: str,
           result: ConversionReport) -> nn.Module:
    if saves == "output" and (reason := invertibility_error(name, params)) is not None:
        saves = "input"
        result.skipped.append((path, f"{name} cannot be inverted ({reason}): fused with "
                                     "saves='input'"))
    if type(bn) is nn.SyncBatchNorm:
        return SyncBatchNormAct2d.from_sync_batchnorm(bn, name, params, backend, saves)
    return BatchNormAct2d.from_batchnorm(bn, name, params, backend, saves)


class _Fuser:
    """Installs one fused BN+act module inside a traced module and records it in the report."""

    def __init__(self, module, path, backend, result, saves):
        self.module, self.path, self.backend, self.result = module, path, backend, result
        self.saves = saves

    def __call__(self, target, bn, name, params, act_module=None, residual=False) -> str | None:
        if _has_hooks(bn) or (act_module is not None and _has_hooks(act_module)):
            return "the norm or its activation has hooks that fusion would bypass"
        fused = _fused(bn, name, params, self.backend, self.saves, _join(self.path, target),
                       self.result)
        self.module.set_submodule(target, fused)
        act = type(act_module).__name__ if act_module else name
        old = f"{type(bn).__name__} + add + {act}" if residual else f"{type(bn).__name__} + {act}"
        kind = "fused_bn_add" if residual else "fused_bn"
        self.result.replaced.append((_join(self.path, target), old, repr(fused), kind))
        return None


def _fuse_sequentials(model, backend, scope, result, saves) -> None:
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        keys = list(seq._modules)
        for first, second in itertools.pairwise(keys):
            bn, act = seq._modules[first], seq._modules[second]
            found = from_torch(act) if act is not None else None
            if not _fusable(bn) or found is None or not scope(_join(path, first)):
                continue
            if _has_hooks(bn) or _has_hooks(act):
                result.skipped.append((_join(path, first), "norm or activation has hooks"))
                continue
            fused = _fused(bn, *found, backend, saves, _join(path, first), result)
            seq._modules[first], seq._modules[second] = fused, nn.Identity()
            old = f"{type(bn).__name__} + {type(act).__name__}"
            result.replaced.append((_join(path, first), old, repr(fused), "fused_bn"))


def _to_native(model, scope, result) -> None:
    for path, parent, slot, child in list(_children(model)):
        if not isinstance(child, Activation):
            continue
        if not scope(path):
            result.skipped.append((path, "outside include/exclude"))
            continue
        try:
            new = to_torch(child.spec.name, child.params, child.inplace)
        except ValueError as exc:
            result.skipped.append((path, str(exc)))
            continue
        setattr(parent, slot, _adopt(new, child))
        result.replaced.append((path, type(child).__name__, repr(new), "module"))
    _unfuse(model, scope, result)
    _native_functional(model, scope, result)
    if result.skipped:
        warnings.warn(
            "mishkit.convert(..., 'native') left some modules unconverted:\n"
            + "\n".join(f"  {p}: {r}" for p, r in result.skipped), UserWarning, stacklevel=3)


def _native_functional(model, scope, result) -> None:
    """mishkit functional calls in rewritten forwards -> the equivalent torch function calls."""
    for path, module in model.named_modules():
        installed = module.__dict__.get("forward")
        if not isinstance(installed, fx.RewrittenForward) or not scope(path):
            continue
        graph, changed = fx.module_graph(module, path), False
        for node in fx.mishkit_activation_calls(graph):
            where = f"{path}:{fx.describe(node)}"
            try:
                make = fx.native_call(*fx.call_activation(node, module))
            except ValueError as exc:
                result.skipped.append((where, str(exc)))
                continue
            with graph.inserting_after(node):
                new = make(graph, node.args[0])
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
            result.replaced.append((where, "mishkit.functional.activation",
                                    f"torch.nn.functional.{new.target.__name__}", "functional"))
        if changed:
            fx.install(module, graph)


def _unfuse(model, scope, result) -> None:
    """BatchNormAct2d -> BatchNorm2d plus a torch activation after it."""
    for path, parent, slot, child in list(_children(model)):
        if not isinstance(child, BatchNormAct2d) or not scope(path):
            continue
        name, params = child.activation, child.activation_params
        try:
            to_torch(name, params)
        except ValueError as exc:
            result.skipped.append((path, str(exc)))
            continue
        bn, name, params = child.to_batchnorm()
        if (name, params) == IDENTITY:  # a shortcut norm saving its output: a plain norm again
            setattr(parent, slot, bn)
            result.replaced.append((path, type(child).__name__, type(bn).__name__, "fused_bn"))
            continue
        keys = list(parent._modules)
        after = keys[keys.index(slot) + 1] if slot != keys[-1] else None
        if isinstance(parent, nn.Sequential) and type(parent._modules.get(after)) is nn.Identity:
            parent._modules[slot], parent._modules[after] = bn, to_torch(name, params)
        else:
            try:
                graph = fx.module_graph(parent, path.rpartition(".")[0])
            except fx.UntraceableModuleError as exc:
                result.skipped.append((path, f"cannot place the activation after it: {exc}"))
                continue
            setattr(parent, slot, bn)
            for node in [n for n in graph.nodes if n.op == "call_module" and n.target == slot]:
                fx.unfuse_call(graph, node, fx.native_call(name, params))
            fx.install(parent, graph)
        result.replaced.append((path, type(child).__name__, f"{type(bn).__name__} + {name}",
                                "fused_bn"))
