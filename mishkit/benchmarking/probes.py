"""Memory probes: bytes saved for backward (everywhere) and peak memory of a step (GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_bytes(fn: Callable, *inputs) -> int:
    """Activation bytes autograd saves for backward in ``fn(*inputs)``, each storage once.

    Uses ``mishkit.memory.saved_tensor_bytes`` when that module imports (one definition of the
    number across mishkit: parameters excluded); otherwise the same hooks here, counting all.
    """
    try:
        from mishkit.memory import saved_tensor_bytes
    except ImportError:
        return _saved_bytes_by_hooks(fn, *inputs)
    return int(saved_tensor_bytes(fn, *inputs).total)


def _saved_bytes_by_hooks(fn: Callable, *inputs) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn(*inputs)
    del output
    return sum(storages.values())


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated bytes above the starting point while ``step()`` runs; None off-GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline
