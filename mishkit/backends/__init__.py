"""Which kernel backends exist on this machine, why the others don't, and the one kernel table.

Backends, fastest first: ``cuda`` (C++ extension, CUDA kernels), ``triton``, ``cpu`` (C++
extension, vectorized CPU kernels) and ``torch`` (pure-PyTorch reference, always there).
:func:`choose` resolves ``backend="auto"`` or validates a forced backend; :func:`kernels` maps the
chosen name to its :class:`~mishkit._checks.KernelSet`, which serves the activation forward and
backward and the fused BatchNorm + activation alike.

Kernel sets load at import where they can run (the extension always; Triton when there is a CUDA
device or ``TRITON_INTERPRET=1``), so that ``import mishkit`` registers every op's fake kernel and
autograd formula, and so that traced code only ever reads plain module-level dicts.
"""

from __future__ import annotations

import importlib

import torch

from .._checks import KernelSet
from . import extension, reference, reference_output
from .triton import interpret_mode

BACKENDS = ("cuda", "triton", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_KERNELS: dict[str, KernelSet] = {
    "torch": reference.KERNELS._replace(bn_act_output=reference_output.KERNELS)}
if extension.KERNELS is not None:
    _KERNELS["cpu"] = _KERNELS["cuda"] = extension.KERNELS
# backends whose activation op sets a forward-mode tangent itself (the extension's C++ autograd);
# for the others mishkit.ops.apply computes it with their backward op
FORWARD_AD_IN_KERNELS = frozenset(("cpu", "cuda"))
_TRITON_ERROR: list[str | None] = []  # [] until the first load attempt, then [reason or None]


def extension_module():
    """``(mishkit._C, None)``, or ``(None, reason)`` when the extension is unavailable."""
    return extension.MODULE, extension.REASON


def triton_import_error() -> str | None:
    """Why the Triton kernels can't be imported, or None once they are (loads them once)."""
    if not _TRITON_ERROR:
        _TRITON_ERROR.append(_load_triton())
    return _TRITON_ERROR[0]


def _load_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    try:
        act = importlib.import_module(".triton.act", __name__)
        bn_act = importlib.import_module(".triton.bn_act", __name__)
        bn_act_output = importlib.import_module(".triton.bn_act_output", __name__)
    except Exception as exc:  # a broken triton install must not break mishkit
        return f"mishkit's Triton kernels failed to import: {type(exc).__name__}: {exc}"
    _KERNELS["triton"] = KernelSet(act.KERNELS, bn_act.KERNELS, bn_act_output.KERNELS)
    return None


if torch.cuda.is_available() or interpret_mode():
    triton_import_error()


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` can't run (on ``device``, if given), or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(('auto', *BACKENDS))}"
    if backend == "torch":
        return None
    if backend == "triton":
        if (reason := triton_import_error()) is not None:
            return reason
        if device is None:
            if torch.cuda.is_available() or interpret_mode():
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 was not set for CPU interpretation"
        if device.type == "cuda" or (device.type == "cpu" and interpret_mode()):
            return None
        return (
            f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a {device.type} tensor"
        )
    module, reason = extension_module()
    if module is None:
        return reason
    if backend == "cuda":
        if not module.with_cuda():
            return "mishkit._C was built without CUDA (no CUDA torch or nvcc at build time)"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
    wanted = "cuda" if backend == "cuda" else "cpu"
    if device is not None and device.type != wanted:
        return f"the {backend} backend runs on {wanted} tensors, got a {device.type} tensor"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on this machine (for tensors on ``device``, if given), fastest first."""
    dev = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if unavailable_reason(b, dev) is None]


def backend_status() -> dict[str, str]:
    """Every backend with 'available' or the reason it is not (what `mishkit info` prints)."""
    return {b: unavailable_reason(b) or "available" for b in BACKENDS}


def check_backend_name(backend, where: str) -> None:
    """ValueError naming ``where`` unless ``backend`` is "auto" or a known backend name."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"{where}: unknown backend {backend!r}; choose one of {', '.join(('auto', *BACKENDS))}"
        )


def choose(backend: str, device: torch.device, op_name: str) -> str:
    """Resolve ``backend="auto"`` to the fastest backend for ``device``; validate a forced one.

    "auto" falls back down the order; a forced backend that can't run raises, saying why.
    """
    if backend == "auto":
        chosen = _AUTO_CHOICE.get(device.type)
        if chosen is None:
            chosen = _AUTO_CHOICE[device.type] = _first_available(device)
        return chosen
    check_backend_name(backend, f"mishkit.{op_name}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"mishkit.{op_name}: backend {backend!r} is unavailable: {reason}")
    return backend


# device type -> the backend "auto" runs there: what decides it (the extension and its CUDA build,
# Triton's import) is settled at import, and every activation call asks
_AUTO_CHOICE: dict[str, str] = {}


def _first_available(device: torch.device) -> str:
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def kernels(backend: str) -> KernelSet:
    """The kernel set of a backend :func:`choose` returned: one lookup for every kernel."""
    return _KERNELS[backend]
