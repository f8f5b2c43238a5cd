"""Memory probes: bytes saved for backward (everywhere) and peak memory of a step (GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mishkit.memory import saved_tensor_bytes


def saved_bytes(fn: Callable, *inputs) -> int:
    """Activation bytes autograd saves for backward in ``fn(*inputs)``, each storage once
    (``mishkit.memory.saved_tensor_bytes``: one definition of the number, parameters excluded)."""
    return int(saved_tensor_bytes(fn, *inputs).total)


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
