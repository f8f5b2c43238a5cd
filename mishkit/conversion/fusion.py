"""``convert(fuse_bn=True)``: BatchNorm followed by an activation -> one fused BN+act module.

Four shapes, each keeping every state_dict key:

- ``Sequential(..., bn, act, ...)``: the norm slot gets the fused module, the act slot Identity;
- in a traced forward, ``act(bn(x))`` and ``act(bn(x) + r)`` (a residual block's end);
- across a module boundary, ``act(child(x) + r)`` where ``child``'s output is a BN's output
  (Hugging Face ResNet / RegNet: the BN sits in ``layer[-1].normalization``, add and activation
  in the block): the BN call moves out of the child's forward into the block's fused call, so
  ``child`` alone returns the value before that BN from then on;
- timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` (a BN subclass with ``drop`` and ``act``
  children) -> mishkit's fused module, once its activation was converted.

``saves="output"`` (``fuse_bn="output"``) makes the fused modules save only their output; where
the activation cannot be inverted, the pair is fused saving its input and the report says so. The
plain BN ending the shortcut of such a residual block is made to save its output too (an
identity ``BatchNormAct2d``): the block saves that output anyway, so the two share one tensor.

A fused module that took a third-party norm's place remembers it, so ``convert(m, "native")``
puts the original object back.
"""

from __future__ import annotations

import itertools
from collections import Counter

import torch
from torch import nn

from ..backends.inversion import invertibility_error
from ..batchnorm import BatchNormAct2d, SyncBatchNormAct2d
from ..nn import from_torch
from . import fx
from .mappings import NORM_ACT, qualified_name
from .modules import IDENTITY_ACT, children, has_hooks, join

ORIGINAL = "_mishkit_replaced"  # instance attribute of a fused module: the norm it replaced


def fusable(module: nn.Module) -> bool:
    """A norm to fuse with the activation after it: BatchNorm2d, SyncBatchNorm, or timm's
    norm-act modules whose activation and drop are Identity (a plain BN)."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return True
    return (qualified_name(module) in NORM_ACT
            and all(type(module._modules.get(k)) is nn.Identity for k in ("act", "drop")))


def fused_from(bn: nn.Module, name: str, params: tuple, backend: str, saves: str, path: str,
               result) -> BatchNormAct2d:
    if saves == "output" and (reason := invertibility_error(name, params)) is not None:
        saves = "input"
        result.skipped.append((path, f"{name} cannot be inverted ({reason}): fused with "
                                     "saves='input'"))
    if isinstance(bn, nn.SyncBatchNorm):
        fused = SyncBatchNormAct2d.from_sync_batchnorm(bn, name, params, backend, saves)
    else:
        fused = BatchNormAct2d.from_batchnorm(bn, name, params, backend, saves)
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        object.__setattr__(fused, ORIGINAL, bn)  # not a submodule: no state_dict entry
    return fused


class GraphFuser:
    """Installs one fused BN+act module inside a traced module and records it in the report."""

    def __init__(self, module, path, backend, saves, result):
        self.module, self.path, self.backend, self.result = module, path, backend, result
        self.saves = saves

    def __call__(self, target, bn, name, params, act_module=None, residual=False) -> str | None:
        if has_hooks(bn) or (act_module is not None and has_hooks(act_module)):
            return "the norm or its activation has hooks that fusion would bypass"
        fused = fused_from(bn, name, params, self.backend, self.saves, join(self.path, target),
                           self.result)
        self.module.set_submodule(target, fused)
        act = type(act_module).__name__ if act_module else name
        old = f"{type(bn).__name__} + add + {act}" if residual else f"{type(bn).__name__} + {act}"
        kind = "fused_bn_add" if residual else "fused_bn"
        self.result.replaced.append((join(self.path, target), old, repr(fused), kind))
        return None


def fuse_sequentials(model, backend, saves, scope, result) -> None:
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        for first, second in itertools.pairwise(list(seq._modules)):
            bn, act = seq._modules[first], seq._modules[second]
            found = from_torch(act) if act is not None else None
            if bn is None or not fusable(bn) or found is None or not scope(join(path, first)):
                continue
            if has_hooks(bn) or has_hooks(act):
                result.skipped.append((join(path, first), "norm or activation has hooks"))
                continue
            fused = fused_from(bn, *found, backend, saves, join(path, first), result)
            seq._modules[first], seq._modules[second] = fused, nn.Identity()
            old = f"{type(bn).__name__} + {type(act).__name__}"
            result.replaced.append((join(path, first), old, repr(fused), "fused_bn"))


def fuse_norm_acts(model, backend, saves, scope, result) -> None:
    """timm's BatchNormAct2d / SyncBatchNormAct with a converted activation -> fused module."""
    for path, parent, slot, child in list(children(model)):
        if qualified_name(child) not in NORM_ACT or not scope(path):
            continue
        act, drop = child._modules.get("act"), child._modules.get("drop")
        if type(act) is nn.Identity:
            continue  # a plain BN: fused with the activation after it in a traced forward
        found = from_torch(act) if act is not None else None
        if drop is not None and type(drop) is not nn.Identity:
            reason = f"its {type(drop).__name__} sits between the norm and its activation"
        elif found is None:
            reason = f"its activation {type(act).__name__} was not converted"
        elif has_hooks(child) or has_hooks(act):
            reason = "norm or activation has hooks"
        else:
            fused = fused_from(child, *found, backend, saves, path, result)
            setattr(parent, slot, fused)
            old = f"{type(child).__name__} (act={type(act).__name__})"
            result.replaced.append((path, old, repr(fused), "fused_bn"))
            continue
        result.skipped.append((path, f"{type(child).__name__} not fused: {reason}"))


class CrossBoundary:
    """``act(child(x) + r)`` where ``child`` returns a BN's output: fuse that BN with the add and
    activation at the block (see the module docstring)."""

    MAX_DEPTH = 8

    def __init__(self, model: nn.Module, graphs: fx.Graphs, backend: str, saves: str, scope,
                 result):
        self.graphs, self.backend, self.scope, self.result = graphs, backend, scope, result
        self.saves = saves
        counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.shared = {key for key, count in counts.items() if count > 1}

    def __call__(self, module: nn.Module, path: str, graph) -> bool:
        changed = False
        for add in list(graph.nodes):  # fusing erases only the add at hand and its activation
            found = fx.residual_add_end(add, module)
            if found is None:
                continue
            operand, other, act = found
            child = module.get_submodule(operand.target)
            if fusable(child) or _calls(graph, operand.target) != 1:
                continue  # a direct BN is fx.fuse_bn's
            tail = self._tail_norm(child, join(path, operand.target))
            act_module = module.get_submodule(act.target) if act.op == "call_module" else None
            if tail is None or (act_module is not None and has_hooks(act_module)):
                continue
            owner_path, bn_node, bn, rel = tail
            target = f"{operand.target}.{rel}"
            if not self.scope(join(path, target)):
                continue
            found = fx.call_activation(act, module)
            fused = fused_from(bn, *found, self.backend, self.saves, join(path, target),
                               self.result)
            fx.bypass(self.graphs.traced[owner_path][1], bn_node)
            self.graphs.dirty.add(owner_path)
            module.set_submodule(target, fused)
            fx.fuse_residual_call(graph, add, operand, other, act, target)
            name = type(act_module).__name__ if act_module else found[0]
            self.result.replaced.append((join(path, target),
                                         f"{type(bn).__name__} + add + {name} (across modules)",
                                         repr(fused), "fused_bn_add"))
            changed = True
        return changed

    def _tail_norm(self, module: nn.Module, path: str):
        """(owner path, BN node in the owner's graph, BN module, BN path relative to ``module``)
        when ``module``'s output is that BN's output through single-use calls; else None."""
        rel = ""
        for _ in range(self.MAX_DEPTH):
            if has_hooks(module) or id(module) in self.shared or not _traceable(module):
                return None
            graph = self.graphs.get(path, module)
            node = None if graph is None else fx.output_source(graph, module)
            if node is None or _calls(graph, node.target) != 1:
                return None
            sub = module.get_submodule(node.target)
            rel = join(rel, node.target)
            if fusable(sub):
                if has_hooks(sub) or id(sub) in self.shared:
                    return None
                return path, node, sub, rel
            module, path = sub, join(path, node.target)
        return None


def _traceable(module: nn.Module) -> bool:
    return type(module) is nn.Sequential or fx.traceable_kind(module)


def _calls(graph, target: str) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)


def shortcut_norms_save_output(module, graph, path, backend, scope, result) -> None:
    """The plain BatchNorm ending the shortcut (``r = downsample(x)``) of a fused saves="output"
    block -> an identity BatchNormAct2d saving its output: it no longer keeps its input, and its
    output is the ``r`` the block saves anyway."""
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
        where = join(path, target)
        if (type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm)
                or _calls(graph, residual.target) != 1 or len(residual.users) != 1
                or has_hooks(norm) or not scope(where)):
            continue
        fused = fused_from(norm, *IDENTITY_ACT, backend, "output", where, result)
        module.set_submodule(target, fused)
        result.replaced.append((where, type(norm).__name__, repr(fused), "fused_bn"))
