"""The CPU fused BN+act backward evaluates act' once: the reduce pass stores dz for the elementwise
pass. It must give exactly the gradients of the two-evaluation path it replaces."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mishkit import backends
from mishkit.batchnorm import BatchNormAct2d
from mishkit.batchnorm import autograd as bn_autograd

pytestmark = pytest.mark.skipif("cpu" not in backends.available_backends("cpu"),
                                reason="mishkit._C is not built")


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


def _gradients(module, x, grad):
    return torch.autograd.grad(module(x), [x, module.weight, module.bias], grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["mish", "gelu", "softplus"])
# channels-last rows run C channels as vectors then a scalar tail: 6 channels fill no 512-bit
# float vector, 19 fill one (and two of float64) with a tail left, in every build
@pytest.mark.parametrize("channels", [6, 19])
def test_stored_dz_gives_the_recomputing_backwards_gradients_exactly(
        dtype, channels_last, training, activation, channels, monkeypatch):
    torch.manual_seed(0)
    module = BatchNormAct2d(channels, activation, backend="cpu", dtype=dtype).train(training)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, channels, 5, 7, dtype=dtype) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    assert bn_autograd.stores_dz(backends.kernels("cpu").bn_act, x, activation)
    module.train(training)
    stored = _gradients(module, x, grad)
    monkeypatch.setattr(bn_autograd, "stores_dz", lambda *args: False)
    recomputed = _gradients(module, x, grad)
    for a, b in zip(stored, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_evaluates_the_derivative_once():
    module = BatchNormAct2d(4, "mish", backend="cpu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = module(x)
    with OpLog() as log:
        torch.autograd.grad(y, [x, module.weight], torch.randn_like(y))
    kernels = [(op, args) for op, args in log.calls if op.startswith("mishkit.")]
    assert [op for op, _ in kernels] == ["mishkit.bn_act_backward_reduce_dz",
                                         "mishkit.bn_act_backward_elemt"]
    assert kernels[0][1][5] == "mish"  # the reduce pass evaluates mish'
    assert list(kernels[1][1][-2:]) == ["leaky_relu", [1.0]]  # the elementwise one the identity


@pytest.mark.parametrize("activation,dtype", [("relu", torch.float32),
                                              ("mish", torch.bfloat16)])
def test_cheap_derivatives_and_half_inputs_recompute(activation, dtype):
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    assert not bn_autograd.stores_dz(backends.kernels("cpu").bn_act, x, activation)


@pytest.mark.parametrize("channels_last", [False, True])
def test_reduce_dz_op_schema_fake_and_layout(channels_last):
    x = torch.randn(2, 5, 3, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad, vec = torch.randn_like(x), torch.rand(5) + 0.5
    args = (grad, x, torch.randn(5), vec, torch.randn(5), "silu", [])
    torch.library.opcheck(torch.ops.mishkit.bn_act_backward_reduce_dz, args)
    sum_dz, sum_dz_xmu, dz = torch.ops.mishkit.bn_act_backward_reduce_dz(*args)
    assert dz.stride() == x.stride()
    expected = torch.ops.mishkit.bn_act_backward_reduce(*args)
    torch.testing.assert_close((sum_dz, sum_dz_xmu), expected, rtol=0, atol=0)
