"""``python -m mishkit info``: what this installation can do, and why not where it can't."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from . import backends
from .registry import ACTIVATIONS

# What each CPU build of mishkit._C needs, as csrc/cpu/act_dispatch.cpp checks it (Linux flag
# names, from /proc/cpuinfo), widest last. With no override the kernels run the widest build the
# CPU supports: on every CPU measured (benchmarks/results/cpu-*/) it is the fastest.
CPU_BUILD_FLAGS = {
    "default": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
CPU_CAPABILITY_ENV = "MISHKIT_CPU_CAPABILITY"


def cpu_model_and_flags() -> tuple[str | None, frozenset[str] | None]:
    """The CPU's model name and feature flags from /proc/cpuinfo (None where it is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None
    model = flags = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = frozenset(value.split())
    return model, flags


def automatic_cpu_capability(flags: frozenset[str] | None) -> str | None:
    """The build the kernels pick without an override, or None when the flags are unknown."""
    if flags is None:
        return None
    return [name for name, needs in CPU_BUILD_FLAGS.items() if flags.issuperset(needs)][-1]


def cpu_capability_reason(active: str, flags: frozenset[str] | None) -> str:
    """Why the CPU kernels run the ``active`` build, in words."""
    forced = os.environ.get(CPU_CAPABILITY_ENV)
    automatic = automatic_cpu_capability(flags)
    if forced and forced.lower() == active:
        return f"forced by {CPU_CAPABILITY_ENV}={forced}"
    if automatic is None:
        return "the widest build this CPU supports (chosen at first use)"
    if active != automatic:
        return (f"switched at run time by mishkit._C.set_cpu_capability (without it: "
                f"{automatic})")
    needs = CPU_BUILD_FLAGS[active]
    detail = f"this CPU has {', '.join(needs)}" if needs else "this CPU has no AVX2 + FMA + F16C"
    return f"the widest build this CPU supports ({detail}); {CPU_CAPABILITY_ENV} overrides it"


def linear_loop_width(capability: str | None, module) -> str | None:
    """The vector width of relu, leaky_relu, hardswish and hardmish's float loops, and why."""
    if capability != "avx512":
        return None
    if module.linear_float_loops_256bit():
        return ("256-bit (the AVX2 build's loops): on AMD CPUs they streamed faster at 256 bits "
                "(Zen 5 measurement)")
    return ("512-bit: on CPUs other than AMD they streamed faster at 512 bits "
            "(Intel Xeon measurement)")


def collect() -> dict:
    """Versions, backend availability with reasons, and the activation names."""
    module, ext_reason = backends.extension_module()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu_model, cpu_flags = cpu_model_and_flags()
    capability = module.cpu_capability() if module is not None else None
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu_model or platform.processor() or platform.machine(),
        "triton": triton_version,
        "triton_interpret": backends.interpret_mode(),
        "extension": {
            "loaded": module is not None,
            "version": module.version() if module is not None else None,
            "with_cuda": module.with_cuda() if module is not None else None,
            "cpu_capability": capability,
            "cpu_capability_reason": (cpu_capability_reason(capability, cpu_flags)
                                      if capability is not None else None),
            "linear_float_loops": (linear_loop_width(capability, module)
                                   if module is not None else None),
            "reason": ext_reason,
        },
        "backends": backends.backend_status(),
        "activations": {
            name: {"aliases": list(spec.aliases), "params": spec.params, "formula": spec.formula}
            for name, spec in ACTIVATIONS.items()
        },
    }
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"python {info['python']}  torch {info['torch']}  CUDA {info['torch_cuda'] or 'none'}"
          f"  triton {info['triton'] or 'not installed'}"
          f"{'  (TRITON_INTERPRET=1)' if info['triton_interpret'] else ''}")
    if info["cuda_device"]:
        print(f"GPU: {info['cuda_device']}")
    print(f"CPU: {info['cpu']}")
    if ext["loaded"]:
        print(f"extension mishkit._C {ext['version']}: CPU kernels ({ext['cpu_capability']}), "
              f"CUDA kernels {'built' if ext['with_cuda'] else 'not built'}")
        print(f"  CPU build {ext['cpu_capability']}: {ext['cpu_capability_reason']}")
        if ext["linear_float_loops"]:
            print(f"  relu, leaky_relu, hardswish, hardmish float loops: "
                  f"{ext['linear_float_loops']}")
    else:
        print(f"extension mishkit._C: not loaded: {ext['reason']}")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:<7} {status}")
    print("activations:")
    for name, entry in info["activations"].items():
        extras = []
        if entry["aliases"]:
            extras.append("aliases: " + ", ".join(entry["aliases"]))
        if entry["params"]:
            extras.append(", ".join(f"{k}={v:g}" for k, v in entry["params"].items()))
        print(f"  {name:<11} {entry['formula']}" + (f"  [{'; '.join(extras)}]" if extras else ""))
    return 0
