"""The run-time route for activation calls in forward code that torch.fx cannot trace.

:class:`RuntimeForward` becomes the module's ``forward``: it runs the original forward inside a
:class:`torch.overrides.TorchFunctionMode` that sends ``F.relu``, ``torch.relu``, ``x.relu()``,
``F.gelu``, ``F.silu`` ... (those ``replace`` covers) to ``mishkit.functional.activation``. The
mode is scoped to the module's *own* code, helper functions included: forward pre-/post-hooks on
the modules it calls (its children, and the members of its ModuleLists / ModuleDicts) switch
the redirect off while they run, so a child keeps its own conversion (or its exclusion), and a
composite activation module (relu(x)**2, hard-sigmoid) is never rewritten inside. No tracing:
data-dependent control flow and ``self.training`` branches keep working; torch.compile traces
through the mode (``fullgraph=True`` works).

An in-place call stays in place: under autograd the activation is computed from a copy of the
input (mishkit's backward reads the input) and written back with ``copy_``. torch.compile does
not pass the in-place builtins (``torch.relu_``, ``F.relu_``, ``F.leaky_relu_``, ``F.elu_``,
``torch.selu_``) through a function mode, so a forward whose code names one runs eagerly (a
graph break; ``fullgraph=True`` then fails loudly) instead of silently keeping them.

Cost: in eager mode every torch call inside the module (children included) passes through the
mode's Python handler; under torch.compile it is resolved at trace time.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import functional
from ..registry import get_spec
from .fx import FUNCTIONAL_CALLS, hashable
from .mappings import known_function

# function object the mode receives -> (torch class, positional `inplace` index, always in place)
REDIRECTS: dict[object, tuple[type[nn.Module], int | None, bool]] = {
    **{target: spec for target, spec in FUNCTIONAL_CALLS.items() if not isinstance(target, str)},
    torch.Tensor.relu: (nn.ReLU, None, False), torch.Tensor.relu_: (nn.ReLU, None, True),
}  # fmt: skip
_NAMES = {getattr(target, "__name__", None): spec for target, spec in REDIRECTS.items()}
# spelled like the in-place builtins dynamo calls without the mode (x.relu_() shares the name)
COMPILE_BLIND = frozenset({"relu_", "leaky_relu_", "elu_", "selu_"})


class SuspendHook:
    """Pre-/post-forward hook on a module a routed forward calls: no redirect inside it."""

    def __init__(self, route: RuntimeForward, delta: int):
        self.route, self.delta = route, delta

    def __call__(self, module, *args):
        if self.route.active:
            self.route.active[-1].suspended += self.delta


class _Redirect(TorchFunctionMode):
    def __init__(self, route: RuntimeForward):
        super().__init__()
        self.route = route
        self.suspended = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.suspended:
            spec = self.route.targets.get(func)
            if spec is not None:
                return self.route.redirect(func, spec, args, kwargs)
        return func(*args, **kwargs)


class RuntimeForward:
    """A module's forward with its activation calls redirected to mishkit at run time."""

    def __init__(self, owner: nn.Module, classes: tuple[type, ...], name: str, params: tuple,
                 backend: str, previous=None, eager_under_compile: bool = False):
        self.owner, self.previous = owner, previous
        self.eager_under_compile = eager_under_compile
        self.active: list[_Redirect] = []  # one mode per call in progress (re-entrant)
        self.retarget(classes, name, params, backend)

    def retarget(self, classes, name, params, backend) -> bool:
        """Point the redirect at another activation; True if anything changed."""
        new = (tuple(classes), get_spec(name).name, tuple(params), backend)
        if new == getattr(self, "settings", None):
            return False
        self.settings = new
        self.classes, self.name, self.params, self.backend = new
        self.kwargs = get_spec(self.name).kwargs(self.params)
        self.targets = {target: spec for target, spec in REDIRECTS.items()
                        if issubclass(spec[0], self.classes)}
        return True

    def __call__(self, *args, **kwargs):
        if self.eager_under_compile and torch.compiler.is_compiling():
            return _eager(self, args, kwargs)
        return self.run(args, kwargs)

    def run(self, args, kwargs):
        forward = self.previous or type(self.owner).forward.__get__(self.owner)
        mode = _Redirect(self)
        self.active.append(mode)
        try:
            with mode:
                return forward(*args, **kwargs)
        finally:
            self.active.pop()

    def redirect(self, func, spec, args, kwargs):
        _, index, always = spec
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        inplace = always or bool(args[index] if index is not None and len(args) > index
                                 else kwargs.get("inplace", False))
        if not inplace:
            return functional.activation(x, self.name, backend=self.backend, **self.kwargs)
        if torch.is_grad_enabled() and x.requires_grad:
            y = functional.activation(x.clone(), self.name, backend=self.backend, **self.kwargs)
            return x.copy_(y)
        return functional.activation(x, self.name, inplace=True, backend=self.backend,
                                     **self.kwargs)

    def describe(self) -> str:
        eager = " (eager under torch.compile)" if self.eager_under_compile else ""
        return f"mishkit.functional.activation({self.name!r}) at run time{eager}"

    def __reduce__(self):
        return (RuntimeForward, (self.owner, self.classes, self.name, self.params, self.backend,
                                 self.previous, self.eager_under_compile))


@torch.compiler.disable
def _eager(route: RuntimeForward, args, kwargs):
    return route.run(args, kwargs)


def called_modules(owner: nn.Module) -> Iterator[nn.Module]:
    """The modules ``owner``'s forward calls directly: children, and the members of containers."""
    for child in owner._modules.values():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from called_modules(child)
        elif child is not None:
            yield child


def install(owner: nn.Module, classes, name: str, params: tuple, backend: str,
            references=()) -> bool:
    """Route ``owner``'s forward (or retarget its route); True if anything changed.
    ``references``: the activation function names its code holds (activation_references)."""
    current = owner.__dict__.get("forward")
    if isinstance(current, RuntimeForward):
        return current.retarget(classes, name, params, backend)
    route = RuntimeForward(owner, classes, name, params, backend, previous=current,
                           eager_under_compile=bool(COMPILE_BLIND & set(references)))
    for module in called_modules(owner):
        module.register_forward_pre_hook(SuspendHook(route, 1))
        module.register_forward_hook(SuspendHook(route, -1), always_call=True)
    owner.forward = route
    return True


def uninstall(owner: nn.Module) -> RuntimeForward | None:
    """Give ``owner`` its original forward back and drop the hooks; the route, if there was one."""
    route = owner.__dict__.get("forward")
    if not isinstance(route, RuntimeForward):
        return None
    if route.previous is None:
        del owner.forward
    else:
        owner.forward = route.previous
    for module in called_modules(owner):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, SuspendHook)
                        and h.route is route]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    return route


def is_own_hook(hook) -> bool:
    return isinstance(hook, SuspendHook)


# -- which untraceable modules need the route: a look at their code, no tracing ------------------


def activation_references(module: nn.Module, covers_class) -> list[str]:
    """Names of activation functions ``module``'s own methods call (or hold) that ``replace``
    covers, e.g. ``["gelu"]`` for ``nn.functional.gelu(...)`` in forward; empty: nothing to do."""
    names = set(_code_names(type(module))) - set(module._modules)
    found = {name for name in names & set(_NAMES) if covers_class(_NAMES[name][0])}
    for value in module.__dict__.values():
        spec = REDIRECTS.get(value) if hashable(value) else None
        if spec is not None and covers_class(spec[0]):
            found.add(value.__name__)
    return sorted(found)


def composite_references(module: nn.Module) -> list[str]:
    """Known activation / gate *functions* (timm's hard_sigmoid ...) ``module``'s code calls by
    global name or holds: the run-time route would rewrite inside them, so it is refused."""
    found = []
    for cls in _user_classes(type(module)):
        namespace = vars(inspect.getmodule(cls) or types.ModuleType("?"))
        for name in _code_names(cls):
            value = namespace.get(name)
            if isinstance(value, types.FunctionType) and known_function(value) is not None:
                found.append(f"{value.__module__}.{value.__qualname__}")
    for value in module.__dict__.values():
        if isinstance(value, types.FunctionType) and known_function(value) is not None:
            found.append(f"{value.__module__}.{value.__qualname__}")
    return sorted(set(found))


def _user_classes(cls: type) -> list[type]:
    return [c for c in cls.__mro__
            if c is not object and not c.__module__.startswith(("torch.", "mishkit."))]


def _code_names(cls: type) -> frozenset[str]:
    names: set[str] = set()
    for klass in _user_classes(cls):
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            code = getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None
            if isinstance(code, types.CodeType):
                names |= _names(code)
    return frozenset(names)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names

