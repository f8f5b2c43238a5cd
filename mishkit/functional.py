"""``mishkit.functional.<name>(x, *params, inplace=False, backend="auto")`` for every activation.

The functions are generated from the registry, so a new registry entry needs no code here. Each
alias (e.g. ``swish``) is the same function object as its canonical name.

``backend`` is ``"auto" | "cuda" | "triton" | "cpu" | "torch"``; ``"auto"`` picks the fastest one
available for ``x.device``, a forced backend that can't run raises RuntimeError saying why.
"""

from __future__ import annotations

import inspect

import torch

from . import ops
from .registry import _ALIASES, ACTIVATIONS, ActivationSpec, get_spec


def activation(x: torch.Tensor, name: str, *, inplace: bool = False, backend: str = "auto",
               **params) -> torch.Tensor:
    """Apply the activation called ``name`` (or an alias) with keyword ``params``."""
    spec = get_spec(name)
    return ops.apply(x, spec, spec.bind((), params), inplace, backend)


def _make_function(spec: ActivationSpec):
    def function(x, *args, inplace=False, backend="auto", **kwargs):
        params = spec.bind(args, kwargs) if args or kwargs else spec.defaults
        return ops.apply(x, spec, params, inplace, backend)

    parameters = [inspect.Parameter("x", inspect.Parameter.POSITIONAL_ONLY)]
    parameters += [
        inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for key, default in spec.params.items()
    ]
    parameters += [
        inspect.Parameter("inplace", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
    ]
    function.__signature__ = inspect.Signature(parameters)
    function.__name__ = function.__qualname__ = spec.name
    function.__doc__ = f"{spec.name}(x) = {spec.formula}. Fused forward and backward kernels."
    return function


for _spec in ACTIVATIONS.values():
    globals()[_spec.name] = _make_function(_spec)
for _alias, _target in _ALIASES.items():
    globals()[_alias] = globals()[_target]

__all__ = ["activation", *ACTIVATIONS, *_ALIASES]
