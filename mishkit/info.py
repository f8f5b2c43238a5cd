"""``python -m mishkit info``: what this installation can do, and why not where it can't."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from . import backends
from .registry import ACTIVATIONS


def collect() -> dict:
    """Versions, backend availability with reasons, and the activation names."""
    module, ext_reason = backends.extension_module()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_interpret": backends.interpret_mode(),
        "extension": {
            "loaded": module is not None,
            "version": module.version() if module is not None else None,
            "with_cuda": module.with_cuda() if module is not None else None,
            "cpu_capability": module.cpu_capability() if module is not None else None,
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
    if ext["loaded"]:
        print(f"extension mishkit._C {ext['version']}: CPU kernels ({ext['cpu_capability']}), "
              f"CUDA kernels {'built' if ext['with_cuda'] else 'not built'}")
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
