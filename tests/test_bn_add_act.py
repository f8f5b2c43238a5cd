"""act(bn(x) + residual) fused (mishkit.batchnorm.residual) vs BatchNorm2d + add + activation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishkit.batchnorm import BatchNormAct2d, SyncBatchNormAct2d, batch_norm_act
from mishkit.memory import saved_tensor_bytes
from mishkit.registry import get_spec
from tests.test_bn_act import BACKENDS, _assert_buffers_equal, _pair, _set_mode

backend_param = pytest.mark.parametrize("backend", BACKENDS)


def reference(bn: nn.BatchNorm2d, x, residual, activation: str, params: dict):
    """The unfused composition: torch's BatchNorm2d, the add, then the registry's formula."""
    spec = get_spec(activation)
    return spec.reference(bn(x) + residual, **spec.kwargs(spec.bind((), params)))


def _inputs(shape=(3, 4, 5, 6), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=generator) * 2 + 0.5
    residual = torch.randn(shape, dtype=dtype, generator=generator)
    return x.requires_grad_(), residual.requires_grad_()


def _detached(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@backend_param
@pytest.mark.parametrize(
    "activation,params",
    [("mish", {}), ("silu", {}), ("relu", {}), ("leaky_relu", {"negative_slope": 0.2}),
     ("softplus", {"beta": 2.0, "threshold": 5.0})],
)
@pytest.mark.parametrize("training", [True, False])
def test_matches_batchnorm_add_activation(backend, activation, params, training):
    torch.manual_seed(0)
    fused, bn = _pair(4, activation, params, backend=backend)
    _set_mode(training, fused, bn)
    x, residual = _inputs()
    x_ref, residual_ref = _detached(x, residual)
    y, y_ref = fused(x, residual), reference(bn, x_ref, residual_ref, activation, params)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, residual, fused.weight, fused.bias], grad)
    expected = torch.autograd.grad(y_ref, [x_ref, residual_ref, bn.weight, bn.bias], grad)
    for name, a, b in zip(("x", "residual", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, msg=f"grad {name}")
    _assert_buffers_equal(fused, bn)


@backend_param
def test_pooled_channels_last_block_with_contiguous_grads(backend):
    # a squeeze-excitation branch: (N, C, 1, 1) tensors whose channels_last strides differ from
    # the contiguous grad only on size-1 dims; the residual is contiguous
    torch.manual_seed(4)
    fused, bn = _pair(4, "silu", backend=backend)
    features = torch.randn(6, 4, 5, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    x = F.adaptive_avg_pool2d(features, 1).detach().requires_grad_()
    residual = torch.randn(6, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    x_ref, residual_ref = _detached(x, residual)
    y, y_ref = fused(x, residual), reference(bn, x_ref, residual_ref, "silu", {})
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, residual, fused.weight], grad)
    expected = torch.autograd.grad(y_ref, [x_ref, residual_ref, bn.weight], grad)
    for name, a, b in zip(("x", "residual", "weight"), got, expected):
        torch.testing.assert_close(a, b, msg=f"grad {name}")


@backend_param
@pytest.mark.parametrize("activation,params", [("mish", {}), ("elu", {"alpha": 0.7})])
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_gradcheck_float64(backend, activation, params, use_batch_stats):
    torch.manual_seed(1)
    spec = get_spec(activation)
    shape = (2, 2, 2, 2) if backend == "triton" else (2, 3, 3, 2)
    x, residual = _inputs(shape, seed=1)
    channels = shape[1]
    weight = torch.rand(channels, dtype=torch.float64).add_(0.5).requires_grad_()
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(channels, dtype=torch.float64),
               torch.rand(channels, dtype=torch.float64) + 0.5)
    stats = (None, None) if use_batch_stats else running

    def fn(x, residual, weight, bias):
        return batch_norm_act(x, *stats, weight, bias, use_batch_stats, 0.1, 1e-5,
                                         spec.name, spec.bind((), params), backend,
                                         residual=residual)

    # the Triton interpreter is slow per launch: one random direction instead of the Jacobian
    assert torch.autograd.gradcheck(fn, (x, residual, weight, bias),
                                    fast_mode=backend == "triton")


@backend_param
@pytest.mark.parametrize(
    "bn_kwargs",
    [{"momentum": 0.3}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
    ids=["momentum0.3", "cumulative", "no_running_stats", "no_affine"],
)
def test_running_statistics_follow_batchnorm(backend, bn_kwargs):
    fused, bn = _pair(3, "silu", backend=backend, **bn_kwargs)
    for step in range(3):
        x, residual = _inputs((2 + step, 3, 4, 4), seed=step)
        x, residual = x.detach() * (step + 1) + step, residual.detach()
        torch.testing.assert_close(fused(x, residual), F.silu(bn(x) + residual))
        _assert_buffers_equal(fused, bn)
    fused.eval()
    bn.eval()
    x, residual = (t.detach() for t in _inputs((2, 3, 4, 4), seed=9))
    torch.testing.assert_close(fused(x, residual), F.silu(bn(x) + residual))
    assert list(fused.state_dict()) == list(bn.state_dict())


@backend_param
def test_channels_last_input_with_contiguous_residual(backend):
    fused, bn = _pair(6, "mish", backend=backend)
    x, residual = _inputs((2, 6, 3, 5), seed=4)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    x_ref, residual_ref = _detached(x, residual)
    y = fused(x, residual)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y_ref = F.mish(bn(x_ref) + residual_ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(residual.grad, residual_ref.grad)


@backend_param
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_statistics(backend, dtype):
    fused, bn = _pair(4, "mish", dtype=torch.float32, backend=backend)
    # a large common offset: float16 sums would lose the variance entirely
    x = (torch.randn(4, 4, 8, 8) + 40).to(dtype).requires_grad_()
    residual = torch.randn(4, 4, 8, 8).to(dtype).requires_grad_()
    y = fused(x, residual)
    assert y.dtype == dtype and fused.running_mean.dtype == torch.float32
    x64, residual64 = (t.detach().double().requires_grad_() for t in (x, residual))
    bn64 = copy.deepcopy(bn).double()
    y_ref = F.mish(bn64(x64) + residual64)
    tol = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 5e-3, "atol": 5e-3}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(fused.running_var.double(), bn64.running_var, rtol=1e-2, atol=1e-3)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    assert x.grad.dtype == residual.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(residual.grad.double(), residual64.grad, **tol)


class _ResidualEnd(nn.Module):
    """conv -> bn -> (+ block input) -> act: the end of a ResNet block, fused or not."""

    def __init__(self, channels, fused: bool, backend: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.fused = fused
        self.bn = (BatchNormAct2d(channels, "mish", backend=backend) if fused
                   else nn.BatchNorm2d(channels))

    def forward(self, block_input):
        out = self.conv(block_input)  # saves block_input
        if self.fused:
            return self.bn(out, residual=block_input)
        return F.mish(self.bn(out) + block_input)


@backend_param
def test_saves_only_input_and_residual_and_shares_the_residual(backend):
    channels = 8
    block_input = torch.randn(2, channels, 16, 16, requires_grad=True)
    tensor_bytes = block_input.numel() * block_input.element_size()
    # alone: x + residual + a few (C,) vectors
    fused = BatchNormAct2d(channels, "mish", backend=backend)
    x = torch.randn_like(block_input, requires_grad=True)
    alone = saved_tensor_bytes(lambda: fused(x, block_input))
    assert 2 * tensor_bytes <= alone.total <= 2 * tensor_bytes + 8 * channels * 4
    # in a block: the residual is the conv's saved input, counted once
    block = saved_tensor_bytes(_ResidualEnd(channels, True, backend), block_input)
    assert 2 * tensor_bytes <= block.total <= 2 * tensor_bytes + 8 * channels * 4
    unfused = saved_tensor_bytes(_ResidualEnd(channels, False, backend), block_input)
    assert unfused.total >= 3 * tensor_bytes  # + the sum that the activation saves


def test_double_backward_is_rejected():
    fused = BatchNormAct2d(2, "mish", backend="torch").double()
    x, residual = _inputs((2, 2, 3, 3))
    grads = torch.autograd.grad(fused(x, residual).sum(), [x, residual], create_graph=True)
    for grad in grads:
        with pytest.raises(RuntimeError, match="double backward"):
            grad.sum().backward(retain_graph=True)


def test_sync_variant_without_process_group_matches_plain():
    plain, bn = _pair(3, "silu", dtype=torch.float32)
    sync = SyncBatchNormAct2d(3, "silu")
    sync.load_state_dict(plain.state_dict())
    x, residual = _inputs((2, 3, 4, 4), dtype=torch.float32)
    x_sync, residual_sync = _detached(x, residual)
    y, y_sync = plain(x, residual), sync(x_sync, residual_sync)
    torch.testing.assert_close(y_sync, y)
    torch.testing.assert_close(y, F.silu(bn(x.detach()) + residual.detach()))
    grad = torch.randn_like(y)
    y.backward(grad)
    y_sync.backward(grad)
    torch.testing.assert_close(x_sync.grad, x.grad)
    torch.testing.assert_close(residual_sync.grad, residual.grad)
    torch.testing.assert_close(sync.running_var, plain.running_var)


@pytest.mark.parametrize(
    "residual,error,match",
    [
        (3.0, TypeError, "residual must be a torch.Tensor"),
        (torch.randn(2, 3, 4, 5), ValueError, r"residual must match.*\[2, 3, 4, 5\]"),
        (torch.randn(2, 3, 4, 4, dtype=torch.float64), ValueError, "torch.float64"),
    ],
)
def test_bad_residual_is_reported(residual, error, match):
    with pytest.raises(error, match=match):
        BatchNormAct2d(3)(torch.randn(2, 3, 4, 4), residual)
