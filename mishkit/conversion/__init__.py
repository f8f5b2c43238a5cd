"""``mishkit.convert(model, "mish", ...)``: swap a network's activations in place.

Steps: activation modules (torch's, mishkit's, and third-party classes known by qualified name,
:mod:`.mappings`) are replaced through their parent (:mod:`.modules`); with ``functional`` /
``fuse_bn``, each module's own forward is traced by torch.fx (:mod:`.fx`) and rewritten, BN+act
pairs are fused (:mod:`.fusion`), and forwards fx cannot trace get the run-time route
(:mod:`.runtime`) or are reported. Every graph is traced before any is changed, so
``strict=True`` fails without a half-rewritten model. Nothing is skipped silently: every
activation or norm site left unconverted is in ``report.skipped`` with its path and reason, and
a warning counts them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import backends
from ..backends.inversion import invertibility_error
from ..nn import Activation
from ..registry import get_spec
from . import fusion, fx, native, runtime
from .fx import UntraceableModuleError
from .mappings import (
    KNOWN_ACTIVATIONS,
    NORM_ACT,
    identify,
    known_activations,
    qualified_name,
    register_activation,
)
from .modules import OUTSIDE_SCOPE, Replace, Scope, join, swap_modules

DEFAULT_REPLACE: tuple = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Hardswish, nn.Mish, Activation,
    KNOWN_ACTIVATIONS,
)  # fmt: skip
NATIVE = "native"
FUNCTIONAL_MODES = (False, True, "fx", "runtime")
KINDS = ("module", "functional", "runtime", "fused_bn", "fused_bn_add")
__all__ = [
    "DEFAULT_REPLACE",
    "KNOWN_ACTIVATIONS",
    "ConversionReport",
    "UntraceableModuleError",
    "convert",
    "identify",
    "known_activations",
    "qualified_name",
    "register_activation",
]


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    ``replaced``: (path, old, new, kind) with kind module / functional (a rewritten call) /
    runtime (a forward routed at run time) / fused_bn / fused_bn_add (``act(bn(x) + residual)``);
    ``skipped``: (path, reason) for every activation or norm site left as it was.
    """

    replaced: list[tuple[str, str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for *_, kind in self.replaced:
            counts[kind] += 1
        counts["skipped"] = len(self.skipped)
        return counts

    def __str__(self) -> str:
        lines = [f"{path or '<root>'}: {old} -> {new}" for path, old, new, _ in self.replaced]
        lines += [f"{path or '<root>'}: skipped ({reason})" for path, reason in self.skipped]
        lines.append(", ".join(f"{key}={value}" for key, value in self.counts.items()))
        return "\n".join(lines)


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


def _validate(model, replace, backend, functional) -> Replace:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "convert: got a TorchScript module; convert the eager nn.Module before scripting it"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_backend_name(backend, "convert")
    if not any(functional is mode or (functional == mode and isinstance(mode, str))
               for mode in FUNCTIONAL_MODES):
        raise ValueError(f"convert: functional must be one of {FUNCTIONAL_MODES}, "
                         f"got {functional!r}")
    return Replace(replace)


def convert(model: nn.Module, activation, *, replace=DEFAULT_REPLACE, include=None, exclude=None,
            functional: bool | str = False, fuse_bn: bool | str = False, strict: bool = False,
            backend: str = "auto", report: bool = False, **params):
    """Replace ``model``'s activations by ``activation`` (a registry name, alias, or ``"native"``).

    Parameters go as keywords or in a dict: ``convert(m, "leaky_relu", negative_slope=0.2)`` or
    ``convert(m, {"name": "leaky_relu", "negative_slope": 0.2})``. Works in place and returns the
    model, or ``(model, ConversionReport)`` with ``report=True``.

    - ``replace``: what to swap (default :data:`DEFAULT_REPLACE`): nn.Module classes, qualified
      class names, ``KNOWN_ACTIVATIONS`` (Hugging Face / timm / registered classes) and
      ``Activation`` (mishkit's own modules, fused norms and rewritten calls).
    - ``include`` / ``exclude``: fnmatch globs on module paths (``"decoder.*"``).
    - ``functional``: also convert ``F.relu(x)``, ``torch.relu``, ``x.relu()``, ``F.gelu`` ...
      in forward code: ``True`` rewrites them with torch.fx where it can trace and routes the
      rest at run time; ``"fx"`` only rewrites (untraceable forwards are reported); ``"runtime"``
      routes every forward that calls them, without tracing.
    - ``fuse_bn``: BatchNorm2d / SyncBatchNorm followed by an activation -> (Sync)BatchNormAct2d
      (see :mod:`.fusion`: Sequentials, traced forwards, residual ends, across modules, timm).
      ``fuse_bn="output"`` makes them ``saves="output"`` (they keep only their output for
      backward; pairs whose activation cannot be inverted keep ``saves="input"``, reported in
      ``skipped``); ``True`` / ``"input"`` save the input.
    - ``strict``: raise UntraceableModuleError (changing nothing traced) when a forward that
      ``functional`` or ``fuse_bn`` needs cannot be traced, instead of reporting or routing it.
    - ``"native"``: mishkit modules, fused norms and rewritten calls back to plain torch.
    """
    replace = _validate(model, replace, backend, functional)
    name, bound = _resolve(activation, params)
    saves = _fuse_saves(fuse_bn, name, bound)
    scope, result = Scope(include, exclude), ConversionReport()
    if name == NATIVE:
        native.to_native(model, scope, result)
    else:
        swap_modules(model, replace, name, bound, backend, scope, result)
        if functional is not False or saves is not None:
            _Rewrite(model, replace, name, bound, backend, scope, result, functional, saves,
                     strict).run()
    _warn(result, name)
    return (model, result) if report else model


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


def _warn(result: ConversionReport, name: str) -> None:
    notable = [(p, r) for p, r in result.skipped
               if r != OUTSIDE_SCOPE and not r.startswith("already ")]
    if notable:
        shown = "\n".join(f"  {path or '<root>'}: {reason}" for path, reason in notable[:10])
        more = f"\n  ... and {len(notable) - 10} more" if len(notable) > 10 else ""
        warnings.warn(
            f"mishkit.convert(..., {name!r}): {len(notable)} activation or norm site(s) were not "
            f"converted (convert(..., report=True) lists them all):\n{shown}{more}",
            UserWarning, stacklevel=3)
    elif not result.replaced and not result.skipped:
        warnings.warn("mishkit.convert: the model has nothing to convert", UserWarning,
                      stacklevel=3)


class _Rewrite:
    """The functional / fuse_bn half of convert: trace, then rewrite, fuse and route."""

    def __init__(self, model, replace, name, bound, backend, scope, result, functional, saves,
                 strict):
        self.model, self.replace, self.name, self.bound = model, replace, name, bound
        self.backend, self.scope, self.result = backend, scope, result
        self.functional, self.strict = functional, strict
        self.saves = saves  # what fused norms save; None: no fusion
        self.graphs = fx.Graphs()

    def run(self) -> None:
        routes = self._trace_all()
        if self.saves:
            fusion.fuse_sequentials(self.model, self.backend, self.saves, self.scope,
                                    self.result)
            fusion.fuse_norm_acts(self.model, self.backend, self.saves, self.scope, self.result)
        across = fusion.CrossBoundary(self.model, self.graphs, self.backend, self.saves,
                                      self.scope, self.result)
        for path, (module, graph) in list(self.graphs.traced.items()):
            if self._rewrite(module, path, graph, across):
                self.graphs.dirty.add(path)
                runtime.uninstall(module)  # a rewritten graph replaces an earlier route
        self.graphs.install_changed()
        for path, module, names in routes:
            if runtime.install(module, self.replace.classes, self.name, self.bound,
                               self.backend, names):
                self.result.replaced.append(
                    (path, f"{type(module).__name__}.forward calls {', '.join(names)}",
                     module.forward.describe(), "runtime"))

    def _candidates(self):
        """Modules whose own forward may hold calls to rewrite: user code, not an activation
        site, gate or known norm-act module (those are units)."""
        for path, module in self.model.named_modules():
            if (self.scope(path) and fx.traceable_kind(module) and identify(module) is None
                    and qualified_name(module) not in NORM_ACT):
                yield path, module

    def _trace_all(self) -> list:
        """Trace every forward that may need it; returns the forwards to route at run time."""
        routes = []
        for path, module in self._candidates():
            installed = isinstance(module.__dict__.get("forward"), fx.RewrittenForward)
            references = (runtime.activation_references(module, self.replace.covers_class)
                          if self.functional is not False else [])
            if self.functional == "runtime" and not installed and not self.saves:
                if references:
                    routes.append((path, module, references))
                continue
            try:
                self.graphs.add(path, module, fx.module_graph(module, path))
            except UntraceableModuleError as exc:
                norms = ([n for n, c in module.named_children() if fusion.fusable(c)]
                         if self.saves else [])
                if self.strict and (references or norms):
                    raise UntraceableModuleError(
                        f"{exc}. strict=True: nothing was rewritten or routed (module-level "
                        "conversion was kept); make it traceable, or convert without strict"
                    ) from exc
                for norm in norms:
                    self.result.skipped.append(
                        (join(path, norm), f"not fused: its parent's forward cannot be traced "
                                           f"({exc})"))
                if references:
                    self._untraceable_calls(path, module, references, exc, routes)
                continue
            if self.functional == "runtime" and not installed and references:
                routes.append((path, module, references))
        return routes

    def _untraceable_calls(self, path, module, references, exc, routes) -> None:
        composites = runtime.composite_references(module)
        if self.functional == "fx":
            reason = f"functional calls {', '.join(references)} not converted: {exc}"
        elif composites:
            reason = (f"functional calls {', '.join(references)} not converted: {exc}; the "
                      f"run-time route would also rewrite inside {', '.join(composites)}")
        else:
            routes.append((path, module, references))
            return
        self.result.skipped.append((path, reason))

    def _rewrite(self, module, path, graph, across) -> bool:
        changed = False
        installed = isinstance(module.__dict__.get("forward"), fx.RewrittenForward)
        if self.functional in (True, "fx") or (self.functional == "runtime" and installed):
            done, skipped = fx.rewrite_functional(graph, module, self.replace, self.name,
                                                  self.bound, self.backend)
            for described, _ in done:
                self.result.replaced.append(
                    (f"{path}:{described}", described.split()[1],
                     f"mishkit.functional.activation({self.name!r})", "functional"))
            self.result.skipped += [(f"{path}:{d}", reason) for d, reason in skipped]
            changed = bool(done)
        if self.saves and not isinstance(module, nn.Sequential):
            fuser = fusion.GraphFuser(module, path, self.backend, self.saves, self.result)
            done, skipped = fx.fuse_bn(module, graph, fuser, fusion.fusable)
            self.result.skipped += [(join(path, t), reason) for t, reason in skipped]
            changed = across(module, path, graph) or bool(done) or changed
            if self.saves == "output":
                fusion.shortcut_norms_save_output(module, graph, path, self.backend, self.scope,
                                                  self.result)
        return changed
