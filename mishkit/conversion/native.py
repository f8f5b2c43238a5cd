"""``convert(model, "native")``: mishkit modules, fused norms, rewritten calls and run-time routes
back to plain torch (for export), or to the third-party norm a fused module replaced."""

from __future__ import annotations

from torch import nn

from ..batchnorm import BatchNormAct2d
from ..nn import Activation, to_torch
from . import fx, runtime
from .fusion import ORIGINAL
from .modules import IDENTITY_ACT, OUTSIDE_SCOPE, adopt, children


def to_native(model, scope, result) -> None:
    for path, parent, slot, child in list(children(model)):
        if not isinstance(child, Activation):
            continue
        if not scope(path):
            result.skipped.append((path, OUTSIDE_SCOPE))
            continue
        try:
            new = to_torch(child.spec.name, child.params, child.inplace)
        except ValueError as exc:
            result.skipped.append((path, str(exc)))
            continue
        setattr(parent, slot, adopt(new, child))
        result.replaced.append((path, type(child).__name__, repr(new), "module"))
    _unfuse(model, scope, result)
    _native_functional(model, scope, result)
    _remove_routes(model, scope, result)


def _remove_routes(model, scope, result) -> None:
    for path, module in model.named_modules():
        if not scope(path):
            continue
        route = runtime.uninstall(module)
        if route is not None:
            result.replaced.append((path, route.describe(), "torch functions", "runtime"))


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


def _callers(model, fused):
    """(module, graph, nodes) of every rewritten forward that calls ``fused``."""
    for _, module in model.named_modules():
        if not isinstance(module.__dict__.get("forward"), fx.RewrittenForward):
            continue
        graph = module.forward.graph
        nodes = [n for n in graph.nodes
                 if n.op == "call_module" and module.get_submodule(n.target) is fused]
        if nodes:
            yield module, fx.module_graph(module, ""), [n.name for n in nodes]


def _unfuse(model, scope, result) -> None:
    """BatchNormAct2d -> its norm (BatchNorm2d, or the third-party one it replaced) plus a torch
    activation after it, wherever it is called."""
    for path, parent, slot, child in list(children(model)):
        if not isinstance(child, BatchNormAct2d) or not scope(path):
            continue
        name, params = child.activation, child.activation_params
        try:
            make_act = fx.native_call(name, params)
            act_module = to_torch(name, params)
        except ValueError as exc:
            result.skipped.append((path, str(exc)))
            continue
        norm = _restored_norm(child)
        if (name, params) == IDENTITY_ACT and norm._modules.get("act") is None:
            setattr(parent, slot, norm)  # a shortcut norm saving its output: a plain norm again
            result.replaced.append((path, type(child).__name__, type(norm).__name__, "fused_bn"))
            continue
        own_act = norm._modules.get("act")  # a third-party norm-act module's activation slot
        callers = list(_callers(model, child))
        keys = list(parent._modules)
        after = keys[keys.index(slot) + 1] if slot != keys[-1] else None
        if own_act is not None and type(own_act) is not nn.Identity:
            norm.act = act_module  # it was fused whole: callers see the same module again
        elif callers:
            for module, graph, names in callers:
                for node in [n for n in graph.nodes if n.name in names]:
                    fx.unfuse_call(graph, node, make_act)
                fx.install(module, graph)
        elif isinstance(parent, nn.Sequential) and type(parent._modules.get(after)) is nn.Identity:
            parent._modules[after] = act_module
        else:
            try:
                graph = fx.module_graph(parent, path.rpartition(".")[0])
            except fx.UntraceableModuleError as exc:
                result.skipped.append((path, f"cannot place the activation after it: {exc}"))
                continue
            for node in [n for n in graph.nodes if n.op == "call_module" and n.target == slot]:
                fx.unfuse_call(graph, node, make_act)
            fx.install(parent, graph)
        setattr(parent, slot, norm)
        result.replaced.append((path, type(child).__name__, f"{type(norm).__name__} + {name}",
                                "fused_bn"))


def _restored_norm(fused: BatchNormAct2d) -> nn.Module:
    """The norm to put back: the original third-party object (given the fused module's current
    tensors) or a BatchNorm2d / SyncBatchNorm sharing them."""
    original = fused.__dict__.get(ORIGINAL)
    if original is None:
        return fused.to_batchnorm()[0]
    for name in ("weight", "bias"):
        setattr(original, name, getattr(fused, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        original._buffers[name] = fused._buffers.get(name)
    return original.train(fused.training)
