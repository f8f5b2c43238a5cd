"""SyncBatchNormAct2d over 2 gloo processes vs single-process BN + activation on the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mishkit import backends
from mishkit.batchnorm import SyncBatchNormAct2d

CHANNELS = 3
BATCH_SIZES = (3, 5)  # ranks hold different batch sizes
WORLD = len(BATCH_SIZES)


def _backends() -> list[str]:
    return [name for name in ("cpu", "torch")
            if backends.unavailable_reason(name, torch.device("cpu")) is None]


def _data():
    """The full batch, the upstream gradient and the BN parameters, identical in every process."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(BATCH_SIZES), CHANNELS, 4, 3, dtype=torch.float64, generator=generator)
    x = x * 2 + 1
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    weight = torch.rand(CHANNELS, dtype=torch.float64, generator=generator) + 0.5
    bias = torch.randn(CHANNELS, dtype=torch.float64, generator=generator)
    return x, grad, weight, bias


def _rank_slice(rank: int) -> slice:
    start = sum(BATCH_SIZES[:rank])
    return slice(start, start + BATCH_SIZES[rank])


def _tiny_model(backend: str) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 4, 1, dtype=torch.float64),
        SyncBatchNormAct2d(4, "silu", backend=backend, dtype=torch.float64),
    )


def sync_module(backend: str, weight, bias) -> SyncBatchNormAct2d:
    """The SyncBatchNormAct2d every rank runs (Mish, momentum 0.3, the shared parameters)."""
    module = SyncBatchNormAct2d(CHANNELS, "mish", momentum=0.3, backend=backend,
                                dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


def single_process_reference():
    """BatchNorm2d + F.mish on the concatenated batch: ``(bn, x with its grad, y)``."""
    x_full, grad_full, weight, bias = _data()
    bn = nn.BatchNorm2d(CHANNELS, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x_full.clone().requires_grad_()
    y = F.mish(bn(x))
    y.backward(grad_full)
    return bn, x, y.detach()


def _worker(rank: int, port: int, backend_names: list[str], results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        x_full, grad_full, weight, bias = _data()
        local = _rank_slice(rank)
        out = {}
        for backend in backend_names:
            module = sync_module(backend, weight, bias)
            x = x_full[local].clone().requires_grad_()
            y = module(x)
            y.backward(grad_full[local])
            out[backend] = {
                "y": y.detach(), "grad_x": x.grad, "grad_weight": module.weight.grad,
                "grad_bias": module.bias.grad, "running_mean": module.running_mean,
                "running_var": module.running_var,
            }
            model = nn.parallel.DistributedDataParallel(_tiny_model(backend))
            model(x_full[local]).backward(grad_full[local, :1].expand(-1, 4, -1, -1))
            out[backend]["ddp_grads"] = [p.grad.clone() for p in model.parameters()]
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_sync_bn_act_matches_single_process_on_concatenated_batch():
    backend_names = _backends()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), backend_names, results), nprocs=WORLD, join=True)
        results = dict(results)

    x_full, grad_full, _, _ = _data()
    bn, x, y = single_process_reference()
    reference_model = _tiny_model("torch")
    reference_model[1] = nn.Sequential(nn.BatchNorm2d(4, dtype=torch.float64), nn.SiLU())
    reference_model(x_full).backward(grad_full[:, :1].expand(-1, 4, -1, -1))
    reference_grads = [p.grad for p in reference_model.parameters()]

    for backend in backend_names:
        per_rank = [results[rank][backend] for rank in range(WORLD)]
        for rank, got in enumerate(per_rank):
            local = _rank_slice(rank)
            torch.testing.assert_close(got["y"], y.detach()[local])
            torch.testing.assert_close(got["grad_x"], x.grad[local])
            torch.testing.assert_close(got["running_mean"], bn.running_mean)  # global batch stats
            torch.testing.assert_close(got["running_var"], bn.running_var)
            # DDP averages the per-rank parameter gradients: the full-batch gradient / WORLD
            for ddp_grad, full_grad in zip(got["ddp_grads"], reference_grads):
                torch.testing.assert_close(ddp_grad, full_grad / WORLD)
        # without DDP, weight/bias gradients are per-rank partial sums of the full-batch gradient
        torch.testing.assert_close(sum(r["grad_weight"] for r in per_rank), bn.weight.grad)
        torch.testing.assert_close(sum(r["grad_bias"] for r in per_rank), bn.bias.grad)
