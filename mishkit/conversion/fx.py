"""The torch.fx half of :func:`mishkit.convert`: functional activation calls and BN→act fusion.

Granularity: each user-defined module is traced *shallowly* (every child is a leaf), so a graph
holds exactly that module's own ``forward``, and a module fx cannot trace costs only its own
code. A rewritten graph is installed as the instance's ``forward`` (:class:`RewrittenForward`)
instead of swapping the module for a ``GraphModule``: the module keeps its class, attributes,
hooks, parameters and state_dict keys, and the root can be converted in place too. Converting
again rewrites the installed graph, never the original code.

Plain helper functions stay one call node ("leaves") when they are known activations or gates
(:mod:`.mappings`: never rewritten inside), and when tracing fails inside a module-level helper
called from forward (e.g. padding computed with ``int(x.shape[-1])``): the trace is retried
with that helper as a leaf, which runs on real tensors at run time exactly as before.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree

from .. import functional
from ..nn import Activation, from_torch
from ..registry import get_spec
from .mappings import known_function


class UntraceableModuleError(RuntimeError):
    """torch.fx could not trace a module whose forward had to be rewritten."""


class _ShallowTracer(fx.Tracer):
    # buffers as graph inputs: a forward's buffer updates (a BN's num_batches_tracked.add_) are
    # recorded, not run at trace time
    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


class RewrittenForward:
    """A module's forward compiled from an fx graph; picklable and deep-copyable with its owner."""

    def __init__(self, owner: nn.Module, graph: fx.Graph):
        self.owner, self.graph = owner, graph
        code = graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<mishkit rewritten {type(owner).__name__}.forward>", "exec"),
             namespace)
        self._forward = namespace["forward"]
        self.code = code.src

    def __call__(self, *args, **kwargs):
        return self._forward(self.owner, *args, **kwargs)

    def __reduce__(self):
        return (RewrittenForward, (self.owner, self.graph))


def traceable_kind(module: nn.Module) -> bool:
    """Modules whose own forward may hold functional calls: user code (not torch.nn or mishkit)."""
    if isinstance(module, fx.GraphModule) or isinstance(module.__dict__.get("forward"),
                                                       RewrittenForward):
        return True
    name = type(module).__module__
    return not name.startswith(("torch.", "mishkit."))


MAX_LEAF_RETRIES = 8  # helpers made leaves, one per failed trace, before giving up


def module_graph(module: nn.Module, path: str) -> fx.Graph:
    """A private copy of ``module``'s forward graph; UntraceableModuleError says what failed."""
    installed = module.__dict__.get("forward")
    if isinstance(installed, RewrittenForward):
        return _copy(installed.graph)
    where = f"{path or '<root>'} ({type(module).__qualname__})"
    leaves = _known_leaves(module)
    modes = {m: m.training for m in module.modules()}
    try:
        for _ in range(MAX_LEAF_RETRIES + 1):
            try:
                codes = []
                for training in (True, False):
                    module.train(training)
                    graph = _trace_with_leaves(module, leaves)
                    codes.append(graph.python_code(root_module="self").src)
                break
            except Exception as exc:
                helper = _failing_helper(exc)
                if helper is None or any(helper[0] is space and helper[1] == name
                                         for space, name, _ in leaves):
                    raise UntraceableModuleError(
                        f"torch.fx cannot trace {where}: {type(exc).__name__}: {exc}"
                    ) from exc
                leaves.append(helper)
        else:
            raise UntraceableModuleError(
                f"torch.fx cannot trace {where}: still failing after {MAX_LEAF_RETRIES} helpers "
                "were made leaves"
            )
    finally:
        for m, training in modes.items():
            m.training = training
    if codes[0] != codes[1]:
        raise UntraceableModuleError(
            f"torch.fx cannot trace {where}: its forward branches on self.training, which a traced "
            "graph would freeze"
        )
    return graph


def _leaf(fn: Callable) -> Callable:
    """``fn`` recorded as one call node when any argument is traced, else called as is."""

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        for value in _pytree.tree_leaves((args, kwargs)):
            if isinstance(value, fx.Proxy):
                return value.tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return leaf


def _forward_function(module: nn.Module):
    return inspect.unwrap(type(module).forward)


def _known_leaves(module: nn.Module) -> list[tuple[dict, str, Callable]]:
    """(namespace, name, function) of known activation / gate functions forward can reach."""
    leaves = []
    namespace = getattr(_forward_function(module), "__globals__", {})
    for space in (namespace, module.__dict__):
        for name, value in list(space.items()):
            if isinstance(value, types.FunctionType) and known_function(value) is not None:
                leaves.append((space, name, value))
    return leaves


def _trace_with_leaves(module: nn.Module, leaves) -> fx.Graph:
    saved = [(space, name, space[name]) for space, name, _ in leaves]
    try:
        for space, name, fn in leaves:
            space[name] = _leaf(fn)
        return _ShallowTracer().trace(module)
    finally:
        for space, name, value in saved:
            space[name] = value


def _failing_helper(exc: BaseException) -> tuple[dict, str, Callable] | None:
    """The module-level function, called by name from user code, in which tracing failed."""
    frames = [frame for frame, _ in _walk(exc.__traceback__)]
    for caller, frame in itertools.pairwise(frames):
        if _is_library_code(caller.f_globals):
            continue
        name = frame.f_code.co_name
        fn = caller.f_globals.get(name)
        if (isinstance(fn, types.FunctionType) and fn.__code__ is frame.f_code
                and fn.__qualname__ == name and not _is_library_code(fn.__globals__)):
            return caller.f_globals, name, fn
    return None


def _walk(tb):
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _is_library_code(namespace: dict) -> bool:
    return str(namespace.get("__name__", "")).startswith(("torch.", "mishkit.", "builtins"))


def install(module: nn.Module, graph: fx.Graph) -> None:
    graph.lint()
    module.forward = RewrittenForward(module, graph)


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


# -- functional activation calls -------------------------------------------------------------------
# call target (function, or method name) -> (torch module class it stands for, index of its
# positional `inplace` argument or None, always in place?)
FUNCTIONAL_CALLS: dict[object, tuple[type[nn.Module], int | None, bool]] = {
    F.relu: (nn.ReLU, 1, False), torch.relu: (nn.ReLU, None, False),
    F.relu_: (nn.ReLU, None, True), torch.relu_: (nn.ReLU, None, True),
    "relu": (nn.ReLU, None, False), "relu_": (nn.ReLU, None, True),
    F.relu6: (nn.ReLU6, 1, False),
    F.leaky_relu: (nn.LeakyReLU, 2, False), F.leaky_relu_: (nn.LeakyReLU, None, True),
    F.elu: (nn.ELU, 2, False), F.elu_: (nn.ELU, None, True),
    F.selu: (nn.SELU, 1, False), torch.selu: (nn.SELU, None, False),
    torch.selu_: (nn.SELU, None, True),
    F.silu: (nn.SiLU, 1, False), F.gelu: (nn.GELU, None, False),
    F.hardswish: (nn.Hardswish, 1, False), F.mish: (nn.Mish, 1, False),
    F.softplus: (nn.Softplus, None, False),
}  # fmt: skip


def _is_call(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method")


def hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _first_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def _is_inplace(node: fx.Node, index: int | None, always: bool) -> bool:
    if always:
        return True
    if index is not None and len(node.args) > index:
        return bool(node.args[index])
    return bool(node.kwargs.get("inplace", False))


def rewrite_functional(graph: fx.Graph, module: nn.Module, replace, name: str,
                       params: tuple, backend: str) -> tuple[list, list]:
    """Point functional activation calls that ``replace`` covers to mishkit ``name``.

    ``replace`` is the conversion's matcher (``covers_class(cls)``, ``covers_known(known)``).
    mishkit's own rewritten calls count as :class:`mishkit.nn.Activation`, so converting again to
    another activation retargets them, and to the same one changes nothing. Known third-party
    activation functions are rewritten whole. Returns ``(done, skipped)`` lists of
    ``(description, reason)``. An in-place call is rewritten out of place only when nothing else
    reads its input (otherwise the program relied on the mutation).
    """
    done, skipped = [], []
    make = mishkit_call(name, params, backend)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is functional.activation:
            if not replace.covers_class(Activation) or (
                call_activation(node, module) == (get_spec(name).name, params)
                and node.kwargs.get("backend") == backend
            ):
                continue
            index, always = None, False
        elif _is_call(node) and hashable(node.target) and node.target in FUNCTIONAL_CALLS:
            torch_class, index, always = FUNCTIONAL_CALLS[node.target]
            if not replace.covers_class(torch_class):
                continue
        elif node.op == "call_function" and (known := known_function(node.target)) is not None:
            if known.gate:
                continue
            if known.reason is not None or not replace.covers_known(known):
                reason = known.reason or f"{known.qualname} is not in replace"
                skipped.append((describe(node), reason))
                continue
            index, always = 1, False  # timm's convention: fn(x, inplace=False)
        else:
            continue
        described = describe(node)
        x = _first_input(node)
        if _is_inplace(node, index, always) and (
            x.op == "placeholder" or set(x.users) != {node}
        ):
            skipped.append((described, "in-place call whose input is also used elsewhere"))
            continue
        with graph.inserting_after(node):
            new = make(graph, x)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.append((described, None))
    return done, skipped


def describe(node: fx.Node) -> str:
    target = node.target
    if callable(target):
        target = f"{getattr(target, '__module__', None) or 'torch'}.{target.__name__}"
    elif node.op == "call_method":
        target = f"Tensor.{target}"
    return f"{node.op} {target} (node {node.name})"


def mishkit_call(name: str, params: tuple, backend: str) -> Callable:
    spec = get_spec(name)
    kwargs = {"backend": backend, **spec.kwargs(params)}

    def make(graph: fx.Graph, x: fx.Node) -> fx.Node:
        return graph.call_function(functional.activation, (x, spec.name), dict(kwargs))

    return make


def native_call(name: str, params: tuple) -> Callable:
    """The torch function call equivalent to registry activation ``name`` (for "native")."""
    spec = get_spec(name)
    if spec.native is None:
        raise ValueError(f"activation {spec.name!r} has no torch function to convert back to")
    function, kwargs = spec.native, spec.kwargs(params)
    if isinstance(function, functools.partial):
        function, kwargs = function.func, {**function.keywords, **kwargs}

    def make(graph: fx.Graph, x: fx.Node) -> fx.Node:
        return graph.call_function(function, (x,), dict(kwargs))

    return make


def mishkit_activation_calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is functional.activation]


def call_activation(node: fx.Node, module: nn.Module) -> tuple[str, tuple] | None:
    """``(name, params)`` when ``node`` applies a known activation to one input, else None."""
    if node.op == "call_module":
        return from_torch(module.get_submodule(node.target))
    if node.op == "call_function" and node.target is functional.activation:
        spec = get_spec(node.args[1])
        params = {k: v for k, v in node.kwargs.items() if k not in ("backend", "inplace")}
        return spec.name, spec.bind((), params)
    return None


# ``a + b`` spellings (no alpha) that can end a residual block; ``out += r`` traces as operator.add
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _residual_operand(add: fx.Node, bn: fx.Node) -> fx.Node | None:
    """``r`` when ``add`` is exactly ``bn + r`` or ``r + bn`` with ``r`` a computed tensor."""
    if not _is_call(add) or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    first, second = add.args
    other = second if first is bn else first if second is bn else None
    # parameters / buffers (get_attr) may broadcast, which the fused op does not
    if not isinstance(other, fx.Node) or other is bn or other.op == "get_attr":
        return None
    return other


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) != 1 or _first_input(users[0]) is not node:
        return None
    return users[0]


def fuse_bn(module: nn.Module, graph: fx.Graph, fuse: Callable, fusable: Callable) -> tuple:
    """Fold ``bn(x) -> act`` and ``bn(x) -> add(·, r) -> act`` in ``graph`` into fused modules.

    ``fusable(bn_module)`` says whether a module is a norm to fuse; ``fuse(target, bn, name,
    params, act_module=, residual=)`` installs the fused module at ``target`` and returns None, or
    a reason to skip. Returns ``(done, skipped)``. A residual fusion replaces the activation by
    ``bn(x, residual=r)`` at the activation's place (after ``r`` is computed).
    """
    done, skipped = [], []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or not fusable(module.get_submodule(node.target)):
            continue
        act = add = residual = None
        users = list(node.users)
        if len(users) == 1 and call_activation(users[0], module) is None:
            add, residual = users[0], _residual_operand(users[0], node)
            act = _sole_user(add) if residual is not None else None
        else:
            act = _sole_user(node)
        found = None if act is None else call_activation(act, module)
        if found is None:
            continue
        if calls[node.target] > 1:
            skipped.append((node.target, "the norm is called more than once in forward"))
            continue
        act_module = module.get_submodule(act.target) if act.op == "call_module" else None
        reason = fuse(node.target, module.get_submodule(node.target), *found,
                      act_module=act_module, residual=residual is not None)
        if reason is not None:
            skipped.append((node.target, reason))
            continue
        if residual is None:
            act.replace_all_uses_with(node)
            graph.erase_node(act)
        else:
            with graph.inserting_before(act):
                fused = graph.call_module(node.target, node.args,
                                          {**node.kwargs, "residual": residual})
            act.replace_all_uses_with(fused)
            for erased in (act, add, node):
                graph.erase_node(erased)
        done.append(node.target)
    return done, skipped


def output_source(graph: fx.Graph, module: nn.Module) -> fx.Node | None:
    """The ``call_module`` node whose value ``graph`` returns (looking through nn.Identity),
    when every node on the way has that one use; else None."""
    (output,) = graph.find_nodes(op="output")
    value = output.args[0]
    while isinstance(value, fx.Node) and value.op == "call_module" and len(value.users) == 1:
        if type(module.get_submodule(value.target)) is not nn.Identity:
            return value if len(value.args) == 1 and not value.kwargs else None
        value = value.args[0] if len(value.args) == 1 else None
    return None


def residual_add_end(add: fx.Node, module: nn.Module):
    """``(operand, other, act)`` when ``add`` ends ``act(operand + other)`` with ``operand`` the
    output of a child module call used only by the add, and the sum used only by ``act``."""
    if not _is_call(add) or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    act = _sole_user(add)
    if act is None or call_activation(act, module) is None:
        return None
    for operand, other in (add.args, add.args[::-1]):
        if (isinstance(operand, fx.Node) and operand.op == "call_module"
                and isinstance(other, fx.Node) and other.op != "get_attr"
                and operand is not other and len(operand.users) == 1):
            return operand, other, act
    return None


def bypass(graph: fx.Graph, node: fx.Node) -> None:
    """Remove the one-input call ``node``: its users read its input instead."""
    node.replace_all_uses_with(node.args[0])
    graph.erase_node(node)


def fuse_residual_call(graph: fx.Graph, add: fx.Node, operand: fx.Node, other: fx.Node,
                       act: fx.Node, target: str) -> None:
    """``act(operand + other)`` -> ``target(operand, residual=other)`` at the activation's place."""
    with graph.inserting_before(act):
        fused = graph.call_module(target, (operand,), {"residual": other})
    act.replace_all_uses_with(fused)
    graph.erase_node(act)
    graph.erase_node(add)


def unfuse_call(graph: fx.Graph, node: fx.Node, make_activation: Callable) -> None:
    """Undo :func:`fuse_bn` for one call of a norm module: ``act(node [+ residual])`` after it."""
    residual = node.kwargs.get("residual")
    added = None
    if residual is not None:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "residual"}
        with graph.inserting_after(node):
            added = graph.call_function(operator.add, (node, residual))
    with graph.inserting_after(added or node):
        act = make_activation(graph, added or node)
    node.replace_all_uses_with(act, delete_user_cb=lambda user: user not in (act, added))


class Graphs:
    """Traced graphs by module path, traced at most once, and which ones were changed."""

    def __init__(self):
        self.traced: dict[str, tuple[nn.Module, fx.Graph]] = {}
        self.dirty: set[str] = set()

    def add(self, path: str, module: nn.Module, graph: fx.Graph) -> None:
        self.traced[path] = (module, graph)

    def get(self, path: str, module: nn.Module) -> fx.Graph | None:
        """``module``'s graph (traced now if need be); None where fx cannot trace it."""
        if path not in self.traced:
            try:
                self.traced[path] = (module, module_graph(module, path))
            except UntraceableModuleError:
                return None
        return self.traced[path][1]

    def install_changed(self) -> None:
        for path in sorted(self.dirty):
            install(*self.traced[path])
        self.dirty.clear()
