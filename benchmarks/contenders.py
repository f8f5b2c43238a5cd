"""What the kernel benchmark compares: mishkit's backends against torch's own ways of doing it.

Each contender builds a forward callable ``f(x) -> y`` for one activation on one device, or
raises :class:`Unavailable` with the reason (a missing backend, no native op, ...), which the
harness records instead of crashing. Backward timings go through autograd for every contender,
so each pays the same engine overhead and runs its own backward kernels.

The ``mishkit-cpu-<build>`` contenders (opt-in: ``--contenders``) run the CPU kernels of one
instruction-set build, switched for the whole timed step (forward and its backward) and back
after it, so the builds are timed side by side in one run with the automatic choice
(``mishkit-cpu``) and each row carries its speed-up against every build. Two more pin the AVX-512
build's piecewise-linear float loops (relu, leaky_relu, hardswish, hardmish) at 256 or 512 bits,
the width mishkit._C chooses per CPU vendor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mishkit import backends, functional
from mishkit.info import CPU_BUILD_FLAGS
from mishkit.registry import ActivationSpec

Forward = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[], object]
CPU_BUILD_PREFIX = "mishkit-cpu-"  # + a CPU_VARIANTS name: one contender per variant
# What each "cpu build" contender pins: the ISA build, and the piecewise-linear float loops'
# width in the AVX-512 build (True: 256 bits, False: 512; None: this CPU's default,
# mishkit._C.linear_float_loops_256bit)
CPU_VARIANTS: dict[str, tuple[str, bool | None]] = {
    **{build: (build, None) for build in CPU_BUILD_FLAGS},
    "avx512-linear256": ("avx512", True),
    "avx512-linear512": ("avx512", False),
}


class Unavailable(Exception):
    """A contender that cannot run here; the message says why."""


# The composite formula a user would write in eager mode, in the input's dtype. Where the registry
# reference adds +-inf limit handling (extra kernels), this is the plain textbook formula.
NAIVE_FORMULAS: dict[str, Forward] = {
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x * math.sqrt(0.5))),
    "gelu_tanh": lambda x: 0.5 * x * (
        1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
    ),
    "hardswish": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
    "hardmish": lambda x: x * torch.clamp(x + 2, 0, 2) / 2,
    "tanhexp": lambda x: x * torch.tanh(torch.exp(x)),
    "serf": lambda x: x * torch.erf(F.softplus(x)),
    "smish": lambda x: x * torch.tanh(torch.log1p(torch.sigmoid(x))),
    "logish": lambda x: x * torch.log1p(torch.sigmoid(x)),
    "relu": lambda x: torch.clamp(x, min=0),
}


def naive_formula(spec: ActivationSpec) -> Forward:
    """The eager composite for ``spec`` (the registry reference where it is already plain)."""
    if spec.name in NAIVE_FORMULAS:
        return NAIVE_FORMULAS[spec.name]
    params = dict(spec.params)
    return lambda x: spec.reference(x, **params)


@dataclass(frozen=True)
class BuildContext:
    device: torch.device
    compile_activations: frozenset[str]  # torch.compile costs seconds per graph: opt-in per name


@dataclass(frozen=True)
class Contender:
    name: str
    # "mishkit" (ours), "baseline" (speed-ups are reported against it), "floor", or "cpu build"
    # (one ISA build of the CPU kernels; speed-ups are reported against it too)
    role: str
    build: Callable[[ActivationSpec, BuildContext], Forward]
    description: str
    # wraps the whole timed step (forward and backward), for state the step must run under
    around: Callable[[Step], Step] | None = None
    default: bool = True  # in the run when --contenders is not given


def _mishkit_backend(backend: str) -> Callable[[ActivationSpec, BuildContext], Forward]:
    def build(spec: ActivationSpec, ctx: BuildContext) -> Forward:
        if backend == "triton" and ctx.device.type != "cuda":
            raise Unavailable("the Triton CPU interpreter is a correctness tool, not timed")
        reason = backends.unavailable_reason(backend, ctx.device)
        if reason is not None:
            raise Unavailable(reason)
        name = spec.name
        return lambda x: functional.activation(x, name, backend=backend)

    return build


def _cpu_build(variant: str) -> Callable[[ActivationSpec, BuildContext], Forward]:
    capability, _ = CPU_VARIANTS[variant]

    def build(spec: ActivationSpec, ctx: BuildContext) -> Forward:
        if ctx.device.type != "cpu":
            raise Unavailable(f"the {variant} build of the CPU kernels runs on CPU tensors only")
        reason = backends.unavailable_reason("cpu", ctx.device)
        if reason is not None:
            raise Unavailable(reason)
        module, _ = backends.extension_module()
        previous = module.cpu_capability()
        try:
            module.set_cpu_capability(capability)
        except RuntimeError as exc:  # this CPU lacks the build's instructions
            raise Unavailable(str(exc)) from None
        finally:
            module.set_cpu_capability(previous)
        name = spec.name
        return lambda x: functional.activation(x, name, backend="cpu")

    return build


def _with_cpu_build(variant: str) -> Callable[[Step], Step]:
    """The step with ``variant``'s kernels active while it runs, the previous state after. The
    switches are process-wide (atomic stores), so backward, which autograd runs for CPU tensors
    on the calling thread, takes the same kernels."""
    capability, linear_256bit = CPU_VARIANTS[variant]

    def around(step: Step) -> Step:
        module, _ = backends.extension_module()

        def step_with_build():
            previous = module.cpu_capability(), module.linear_float_loops_256bit()
            module.set_cpu_capability(capability)
            if linear_256bit is not None:
                module.set_linear_float_loops_256bit(linear_256bit)
            try:
                return step()
            finally:
                module.set_cpu_capability(previous[0])
                module.set_linear_float_loops_256bit(previous[1])

        return step_with_build

    return around


def _native(spec: ActivationSpec, ctx: BuildContext) -> Forward:
    if spec.native is None:
        raise Unavailable(f"torch has no native {spec.name} op")
    native = spec.native
    return lambda x: native(x)


def _naive(spec: ActivationSpec, ctx: BuildContext) -> Forward:
    return naive_formula(spec)


def _compiled(spec: ActivationSpec, ctx: BuildContext) -> Forward:
    if spec.name not in ctx.compile_activations:
        raise Unavailable(
            f"torch.compile is measured for {sorted(ctx.compile_activations) or 'no activation'} "
            "only (--compile-activations; each graph compiles for seconds)"
        )
    _raise_recompile_limit()
    # dynamic=True: one graph serves every size instead of one recompilation per size
    return torch.compile(naive_formula(spec), dynamic=True)


def _relu_floor(spec: ActivationSpec, ctx: BuildContext) -> Forward:
    return F.relu


def _raise_recompile_limit() -> None:
    # Every (activation, dtype, grad mode) is a new graph of one code object; the default limit
    # of 8 would silently fall back to eager mid-benchmark.
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("mishkit-cuda", "mishkit", _mishkit_backend("cuda"), "mishkit CUDA kernels"),
        Contender("mishkit-triton", "mishkit", _mishkit_backend("triton"), "mishkit Triton"),
        Contender("mishkit-cpu", "mishkit", _mishkit_backend("cpu"), "mishkit C++ CPU kernels"),
        Contender("mishkit-torch", "mishkit", _mishkit_backend("torch"),
                  "mishkit pure-torch reference backend"),
        Contender("native", "baseline", _native, "torch's native op (F.mish, F.silu, ...)"),
        Contender("naive", "baseline", _naive, "the composite formula in eager mode"),
        Contender("compile", "baseline", _compiled, "torch.compile of the composite formula"),
        Contender("relu", "floor", _relu_floor, "F.relu, the cheapest activation (the floor)"),
        *(Contender(CPU_BUILD_PREFIX + variant, "cpu build", _cpu_build(variant),
                    f"mishkit C++ CPU kernels, {variant} build",
                    around=_with_cpu_build(variant), default=False)
          for variant in CPU_VARIANTS),
    )
}

BASELINES = tuple(name for name, c in CONTENDERS.items() if c.role in ("baseline", "floor"))
CPU_BUILDS = tuple(name for name, c in CONTENDERS.items() if c.role == "cpu build")


def resolve(names: list[str] | None) -> list[Contender]:
    """Contenders by name (the default ones when None); an unknown name is an error listing the
    valid ones."""
    if names is None:
        return [c for c in CONTENDERS.values() if c.default]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}"
        )
    return [CONTENDERS[n] for n in names]
