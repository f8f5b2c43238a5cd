"""BatchNormAct2d against nn.BatchNorm2d followed by the activation, for every available backend."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mishkit import backends
from mishkit._checks import BnActKernels, KernelSet, compute_dtype
from mishkit.backends import reference as torch_backend
from mishkit.batchnorm import BatchNormAct2d, SyncBatchNormAct2d, batch_norm_act
from mishkit.registry import get_spec

from .helpers import saved_bytes

BACKENDS = backends.available_backends("cpu")
# (activation, params) pairs covering smooth, piecewise and parametrized activations
ACTIVATIONS = [("mish", {}), ("silu", {}), ("gelu", {}), ("hardswish", {}), ("relu", {}),
               ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.7}), ("tanhexp", {}),
               ("softplus", {"beta": 2.0, "threshold": 5.0})]
backend_param = pytest.mark.parametrize("backend", BACKENDS)


def reference(bn: nn.BatchNorm2d, x: torch.Tensor, activation: str, params: dict):
    """The unfused composition: torch's BatchNorm2d, then the registry's float64 formula."""
    spec = get_spec(activation)
    return spec.reference(bn(x), **spec.kwargs(spec.bind((), params)))


def _pair(channels=3, activation="mish", params=None, dtype=torch.float64, backend="torch",
          **bn_kwargs):
    params = params or {}
    fused = BatchNormAct2d(channels, activation, backend=backend, dtype=dtype, **bn_kwargs,
                           **params)
    bn = nn.BatchNorm2d(channels, dtype=dtype, **bn_kwargs)
    if bn.affine:  # non-trivial affine parameters
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(bn.state_dict())
    return fused, bn


def _assert_buffers_equal(fused, bn, **tol):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(fused, name), getattr(bn, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=name)


def _set_mode(training, *modules):
    """train/eval; eval gets non-trivial running statistics (4 channels)."""
    for module in modules:
        if not training:
            with torch.no_grad():
                module.running_mean.copy_(torch.linspace(-1, 1, 4))
                module.running_var.copy_(torch.linspace(0.5, 2, 4))
        module.train(training)


@backend_param
@pytest.mark.parametrize("activation,params", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_matches_batchnorm_then_activation(backend, activation, params, training):
    torch.manual_seed(0)
    fused, bn = _pair(4, activation, params, backend=backend)
    _set_mode(training, fused, bn)
    x = (torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), reference(bn, x_ref, activation, params)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, fused.weight, fused.bias], grad)
    expected = torch.autograd.grad(y_ref, [x_ref, bn.weight, bn.bias], grad)
    for name, a, b in zip(("x", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, msg=f"grad {name}")
    _assert_buffers_equal(fused, bn)


@backend_param
@pytest.mark.parametrize(
    "activation,params",
    [("mish", {}), ("leaky_relu", {"negative_slope": 0.3}), ("softplus", {"beta": 1.5})],
)
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_gradcheck_float64(backend, activation, params, use_batch_stats):
    torch.manual_seed(1)
    spec = get_spec(activation)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    stats = (None, None) if use_batch_stats else running

    def fn(x, weight, bias):
        return batch_norm_act(x, *stats, weight, bias, use_batch_stats, 0.1, 1e-5,
                                         spec.name, spec.bind((), params), backend)

    # the Triton interpreter is slow per launch: check one random direction instead of the full
    # Jacobian there (still float64, still against finite differences)
    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=backend == "triton")


@backend_param
@pytest.mark.parametrize("native", [F.mish, F.silu, F.gelu, F.hardswish, F.relu])
def test_float32_matches_torch_native(backend, native):
    torch.manual_seed(2)
    fused, bn = _pair(5, native.__name__, dtype=torch.float32, backend=backend)
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), native(bn(x_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)
    _assert_buffers_equal(fused, bn)


@backend_param
@pytest.mark.parametrize(
    "bn_kwargs",
    [{"momentum": 0.3}, {"momentum": None}, {"track_running_stats": False}, {"affine": False},
     {"affine": False, "momentum": None}],
    ids=["momentum0.3", "cumulative", "no_running_stats", "no_affine", "no_affine_cumulative"],
)
def test_running_statistics_follow_batchnorm(backend, bn_kwargs):
    torch.manual_seed(3)
    fused, bn = _pair(3, "silu", backend=backend, **bn_kwargs)
    for step in range(3):
        x = torch.randn(2 + step, 3, 4, 4, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(fused(x), F.silu(bn(x)))
        _assert_buffers_equal(fused, bn)
    fused.eval()
    bn.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), F.silu(bn(x)))  # eval uses the running stats (if any)
    assert list(fused.state_dict()) == list(bn.state_dict())


@backend_param
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_without_layout_change(backend, training):
    torch.manual_seed(4)
    fused, bn = _pair(6, "mish", backend=backend)
    fused.train(training)
    bn.train(training)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    x_ref = x.detach().contiguous().requires_grad_()
    y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y_ref = F.mish(bn(x_ref))
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@backend_param
@pytest.mark.parametrize("training", [True, False])
def test_pooled_channels_last_input_with_a_contiguous_grad(backend, training):
    # squeeze-excitation / pooled heads: adaptive_avg_pool2d of a channels_last map is (N, C, 1, 1)
    # with strides (C, 1, C, C), and autograd hands back a contiguous grad: the strides differ
    # only on size-1 dims, which address nothing, so neither a rejection nor a copy is right
    torch.manual_seed(8)
    fused, bn = _pair(4, "mish", backend=backend)
    _set_mode(training, fused, bn)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    pooled = F.adaptive_avg_pool2d(x, 1).detach().requires_grad_()
    assert pooled.stride() == (4, 1, 4, 4)
    pooled_ref = pooled.detach().clone().requires_grad_()
    y, y_ref = fused(pooled), reference(bn, pooled_ref, "mish", {})
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    assert grad.stride() == (4, 1, 1, 1)
    got = torch.autograd.grad(y, [pooled, fused.weight, fused.bias], grad)
    expected = torch.autograd.grad(y_ref, [pooled_ref, bn.weight, bn.bias], grad)
    for name, a, b in zip(("x", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, msg=f"grad {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernels_take_grads_whose_strides_differ_only_on_size_one_dims(backend):
    kernels = backends.kernels(backend).bn_act
    x = torch.randn(3, 5, 1, 4, dtype=torch.float64)
    grad = torch.randn(3, 5, 4, 1, dtype=torch.float64).transpose(2, 3)  # size-1 dim moved
    assert grad.stride() != x.stride() and grad.is_contiguous()
    mean, var = kernels.stats(x)
    scale, shift = var.rsqrt(), torch.linspace(-1, 1, 5, dtype=torch.float64)
    got = (kernels.backward_reduce(grad, x, mean, scale, shift, "silu", []),
           kernels.backward_elemt(grad, x, mean, scale, shift, scale, shift, "silu", []))
    want = (torch_backend.bn_act_backward_reduce(grad, x, mean, scale, shift, "silu", []),
            torch_backend.bn_act_backward_elemt(grad, x, mean, scale, shift, scale, shift,
                                                "silu", []))
    torch.testing.assert_close(got, want)
    other = torch.randn(3, 4, 1, 5, dtype=torch.float64).permute(0, 3, 2, 1)  # a real difference
    with pytest.raises((RuntimeError, ValueError), match="grad_out must have x's shape"):
        kernels.backward_reduce(other, x, mean, scale, shift, "silu", [])


@backend_param
def test_channels_last_3d_is_indexed_without_a_copy(backend, monkeypatch):
    real = backends.kernels(backend).bn_act
    inputs = []

    def recording_forward(x, *args):
        inputs.append(x)
        return real.forward(x, *args)

    monkeypatch.setitem(backends._KERNELS, backend, KernelSet(
        backends.kernels(backend).act, real._replace(forward=recording_forward)))
    torch.manual_seed(9)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64) \
        .contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    x_ref = x.detach().contiguous().requires_grad_()
    y = batch_norm_act(x, None, None, weight, bias, True, 0.1, 1e-5, "gelu", (), backend)
    assert inputs[0].data_ptr() == x.data_ptr()  # the kernels indexed x itself
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    y_ref = F.gelu(F.batch_norm(x_ref, None, None, weight, bias, True, 0.1, 1e-5))
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert x.grad.is_contiguous(memory_format=torch.channels_last_3d)


@backend_param
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_statistics_keep_the_variance_of_a_large_offset(backend, channels_last):
    # 1e4 + N(0, 1): in float32, E[x^2] - E[x]^2 would cancel to noise; Welford merges and
    # two-pass sums keep it
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = (x * torch.tensor([1.0, 0.1, 3.0], dtype=torch.float64).view(1, 3, 1, 1) + 1e4).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = backends.kernels(backend).bn_act.stats(x)
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-3, atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available here")
def test_triton_kernels_take_parameters_as_scalars(monkeypatch):
    # a tensor built from host values per call is a pageable host-to-device copy plus a stream
    # sync on GPU, and illegal under CUDA-graph capture
    from mishkit.backends.triton import bn_act as triton_bn_act

    def forbidden(*args, **kwargs):
        raise AssertionError("a Triton BN+act op built a tensor from host values")

    x = torch.randn(2, 3, 4, 4)
    mean, scale, shift = torch.zeros(3), torch.ones(3), torch.zeros(3)
    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch, "as_tensor", forbidden)
    params = ["softplus", [2.0, 5.0]]
    triton_bn_act.stats(x)
    triton_bn_act.forward(x, mean, scale, shift, *params)
    triton_bn_act.backward_reduce(x, x, mean, scale, shift, *params)
    triton_bn_act.backward_elemt(x, x, mean, scale, shift, scale, shift, *params)


@backend_param
def test_non_dense_input(backend):
    fused, bn = _pair(3, "gelu", backend=backend)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)[..., ::2]  # strided view
    torch.testing.assert_close(fused(x), F.gelu(bn(x)))


@backend_param
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_statistics(backend, dtype):
    torch.manual_seed(5)
    fused, bn = _pair(4, "mish", dtype=torch.float32, backend=backend)
    # a large common offset: float16 sums would lose the variance entirely
    x = (torch.randn(4, 4, 8, 8) + 40).to(dtype)
    x.requires_grad_()
    y = fused(x)
    assert y.dtype == dtype and fused.running_mean.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    bn64 = copy.deepcopy(bn).double()
    y_ref = F.mish(bn64(x64))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 4e-3, "atol": 4e-3}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(fused.running_var.double(), bn64.running_var, rtol=1e-2, atol=1e-3)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2)


@backend_param
def test_training_saves_only_input_and_channel_statistics(backend):
    channels = 8
    x = torch.randn(4, channels, 16, 16, requires_grad=True)
    fused = BatchNormAct2d(channels, "mish", backend=backend)
    unfused = nn.Sequential(nn.BatchNorm2d(channels), nn.Mish())
    fused_bytes, unfused_bytes = saved_bytes(fused, x), saved_bytes(unfused, x)
    input_bytes = x.numel() * x.element_size()
    # x itself plus at most a handful of (C,) float32 vectors
    assert input_bytes <= fused_bytes <= input_bytes + 8 * channels * 4
    assert unfused_bytes >= 2 * input_bytes  # BN saves x, the activation saves BN's output


@backend_param
def test_eval_is_one_fused_pass(backend, monkeypatch):
    calls = []
    real = backends.kernels(backend).bn_act

    def counting(name, kernel):
        def wrapped(*args):
            calls.append(name)
            return kernel(*args)

        return wrapped

    counted = BnActKernels(*(k if k is None else counting(n, k)
                             for n, k in zip(real._fields, real)))
    monkeypatch.setitem(backends._KERNELS, backend,
                        KernelSet(backends.kernels(backend).act, counted))
    fused = BatchNormAct2d(3, "mish", backend=backend).eval()
    with torch.no_grad():
        fused(torch.randn(2, 3, 4, 4))
    assert calls == ["forward"]
    calls.clear()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    fused.train()(x).sum().backward()
    reduce = "backward_reduce" if real.backward_reduce_dz is None else "backward_reduce_dz"
    assert calls == ["stats", "forward", reduce, "backward_elemt"]


def test_double_backward_is_rejected():
    fused = BatchNormAct2d(2, "mish", backend="torch").double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_state_dict_is_batchnorm_compatible():
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3))  # non-default running statistics
    fused = BatchNormAct2d(5, "silu")
    fused.load_state_dict(bn.state_dict(), strict=True)
    assert fused.state_dict().keys() == bn.state_dict().keys()
    back = nn.BatchNorm2d(5)
    back.load_state_dict(fused.state_dict(), strict=True)
    torch.testing.assert_close(back.running_var, bn.running_var)


def test_from_batchnorm_shares_tensors_and_round_trips():
    bn = nn.BatchNorm2d(4, momentum=0.2, eps=1e-3).eval()
    handle_calls = []
    bn.register_forward_hook(lambda *args: handle_calls.append(1))
    fused = BatchNormAct2d.from_batchnorm(bn, "leaky_relu", (0.05,), backend="torch")
    assert fused.weight is bn.weight and fused.running_var is bn.running_var
    assert fused.activation_params == (0.05,) and not fused.training
    assert (fused.eps, fused.momentum) == (1e-3, 0.2)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused(x), F.leaky_relu(bn(x), 0.05))
    assert len(handle_calls) == 2
    native, name, params = fused.to_batchnorm()
    assert isinstance(native, nn.BatchNorm2d) and native.weight is bn.weight
    assert (name, params) == ("leaky_relu", (0.05,))


def test_sync_variants_convert_and_survive_convert_sync_batchnorm():
    sync_bn = nn.SyncBatchNorm(3)
    fused = SyncBatchNormAct2d.from_sync_batchnorm(sync_bn, "mish")
    assert fused.weight is sync_bn.weight and isinstance(fused, BatchNormAct2d)
    native, name, _ = fused.to_batchnorm()
    assert isinstance(native, nn.SyncBatchNorm) and name == "mish"
    model = nn.Sequential(BatchNormAct2d(3, "mish"))
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(model)[0], BatchNormAct2d)
    # without an initialized process group it behaves like BatchNormAct2d
    fused_single, bn = _pair(3, "mish", dtype=torch.float32)
    sync_single = SyncBatchNormAct2d(3, "mish")
    sync_single.load_state_dict(fused_single.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sync_single(x), F.mish(bn(x)))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: BatchNormAct2d(3)(torch.randn(2, 3, 4)), ValueError, "4D"),
        (lambda: BatchNormAct2d(3)(torch.randn(2, 4, 3, 3)), ValueError, "3 channels"),
        (lambda: BatchNormAct2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.int64)), TypeError, "dtype"),
        (lambda: BatchNormAct2d(3)(torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value"),
        (lambda: BatchNormAct2d(3, "nope"), ValueError, "unknown activation"),
        (lambda: BatchNormAct2d(3, "elu", beta=2.0), TypeError, "unexpected parameter"),
        (lambda: BatchNormAct2d(3, backend="gpu"), ValueError, "unknown backend 'gpu'"),
        (lambda: BatchNormAct2d.from_batchnorm(nn.BatchNorm1d(3), "mish"), TypeError,
         "BatchNorm2d"),
    ],
)
def test_bad_input_is_reported(make, error, match):
    with pytest.raises(error, match=match):
        make()


@backend_param
@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
    activation=st.sampled_from([a for a, _ in ACTIVATIONS]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(backend, shape, activation, channels_last, seed):
    if shape[0] * shape[2] * shape[3] < 2:
        shape = (2, *shape[1:])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fused, bn = _pair(shape[1], activation, backend=backend)
    torch.testing.assert_close(fused(x), reference(bn, x, activation, {}))
    _assert_buffers_equal(fused, bn)


def _compiled_ops():
    """(prefix, ops namespace entry) for each compiled backend whose ops are loaded."""
    found = []
    if "cpu" in BACKENDS:
        found.append(("cpu", torch.ops.mishkit.bn_act_forward))
    if "triton" in BACKENDS:
        found.append(("triton", torch.ops.mishkit.triton_bn_act_forward))
    return found


@pytest.mark.parametrize("backend,forward_op", _compiled_ops(), ids=[b for b, _ in _compiled_ops()])
def test_kernel_ops_reject_bad_arguments(backend, forward_op):
    x = torch.randn(2, 3, 4, 4)
    vec = torch.zeros(3)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=r"(?i)compute dtype|float"):
        forward_op(x, vec.double(), vec, vec, "mish", [])
    with pytest.raises((RuntimeError, ValueError), match=r"\(C,\)|shape \(3,\)"):
        forward_op(x, torch.zeros(4), vec, vec, "mish", [])
    with pytest.raises((RuntimeError, ValueError), match="contiguous"):
        forward_op(x.transpose(2, 3), vec, vec, vec, "mish", [])
    if backend == "cpu":  # the C++ ops resolve names and parameter counts themselves
        with pytest.raises(ValueError, match="unknown activation"):
            forward_op(x, vec, vec, vec, "nope", [])
        with pytest.raises(ValueError, match="parameter"):
            forward_op(x, vec, vec, vec, "mish", [1.0])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension with BN kernels is not built")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_instruction_sets_agree(dtype, channels_last, capability):
    """Every instruction-set build of the C++ kernels gives the reference's results."""
    from mishkit import _C

    torch.manual_seed(6)
    # odd sizes: vector bodies (8 or 16 lanes) and scalar tails, in both layouts
    x = torch.randn(3, 19, 5, 7, dtype=dtype) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    kernels, previous = backends.kernels("cpu").bn_act, _C.cpu_capability()
    mean = torch.randn(19, dtype=compute_dtype(dtype))
    scale, shift = mean.abs() + 0.5, -mean
    try:
        try:
            _C.set_cpu_capability(capability)
        except RuntimeError as error:  # this CPU lacks the instruction set
            pytest.skip(str(error))
        got = (
            kernels.stats(x), kernels.forward(x, mean, scale, shift, "gelu", []),
            kernels.backward_reduce(grad, x, mean, scale, shift, "gelu", []),
            kernels.backward_elemt(grad, x, mean, scale, shift, scale, shift, "gelu", []),
        )
    finally:
        _C.set_cpu_capability(previous)
    reference = (
        torch_backend.bn_act_stats(x),
        torch_backend.bn_act_forward(x, mean, scale, shift, "gelu", []),
        torch_backend.bn_act_backward_reduce(grad, x, mean, scale, shift, "gelu", []),
        torch_backend.bn_act_backward_elemt(grad, x, mean, scale, shift, scale, shift,
                                                "gelu", []),
    )
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, reference, **tol)
    if channels_last:
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_backends_match_batchnorm_then_activation(backend, dtype, channels_last):
    torch.manual_seed(7)
    fused, bn = _pair(6, "mish", dtype=torch.float32, backend=backend)
    fused, bn64 = fused.cuda(), copy.deepcopy(bn).double().cuda()
    x = torch.randn(4, 6, 9, 7, device="cuda").mul_(3).add_(1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y_ref = fused(x), F.mish(bn64(x64))
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(fused.weight.grad.double(), bn64.weight.grad, **tol)
    torch.testing.assert_close(fused.running_var.double(), bn64.running_var, **tol)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_bn_act_is_cuda_graph_capturable(backend, channels_last):
    # no host-to-device copy, no sync, no host-built tensor per call: forward and backward can be
    # captured once and replayed (torch.cuda.make_graphed_callables warms up, then captures)
    torch.manual_seed(11)
    fused = BatchNormAct2d(16, "softplus", beta=2.0, threshold=5.0, backend=backend).cuda()
    eager = copy.deepcopy(fused)
    x = torch.randn(8, 16, 12, 12, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    graphed = torch.cuda.make_graphed_callables(fused, (x.clone().requires_grad_(),))
    for step in range(2):
        data = (x * (step + 1)).requires_grad_()
        reference = data.detach().clone().requires_grad_()
        y, y_ref = graphed(data), eager(reference)
        grad = torch.randn_like(y_ref)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(data.grad, reference.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                    reason="compute-sanitizer not on PATH")
def test_compute_sanitizer_bn_act():
    # memcheck: every BN+act kernel of the CUDA backend in both layouts, vector and scalar paths
    # (an odd spatial size, a misaligned base), every dtype; racecheck: the shared-memory merges
    script = textwrap.dedent("""
        import sys, torch
        from mishkit.batchnorm import BatchNormAct2d
        shapes = [(3, 8, 4, 4), (2, 6, 5, 5)] if sys.argv[1] == "memcheck" else [(2, 8, 4, 4)]
        dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        for dtype in dtypes if sys.argv[1] == "memcheck" else (torch.float32,):
            for shape in shapes:
                for fmt in (torch.contiguous_format, torch.channels_last):
                    for offset in (0, 1):
                        x = torch.randn(shape, device="cuda").to(dtype)
                        x = x.contiguous(memory_format=fmt)
                        if offset:  # the same layout one element past a 16-byte boundary
                            storage = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
                            x = storage[1:].as_strided(x.shape, x.stride()).copy_(x)
                        fused = BatchNormAct2d(shape[1], "mish", backend="cuda").cuda()
                        x.requires_grad_(True)
                        fused(x).float().sum().backward()
                        with torch.no_grad():
                            fused.eval()(x)
        torch.cuda.synchronize()
        print("clean")
    """)
    for tool in ("memcheck", "racecheck"):
        result = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
                                 sys.executable, "-c", script, tool], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0 and "clean" in result.stdout, \
            f"{tool}: {result.stdout[-3000:]}{result.stderr[-3000:]}"


# Triton ops get their fake kernels from torch.library.triton_op, which traces wrap_triton on
# GPUs; the CPU interpreter would run the kernel on fake data, so only the C++ ops are checked.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_compiled_ops_have_fake_kernels(backend):
    """Shape/dtype propagation without running a kernel (torch.compile / export tracing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels = backends.kernels(backend).bn_act
    with FakeTensorMode():
        x = torch.empty(2, 5, 3, 3, dtype=torch.float16).to(memory_format=torch.channels_last)
        vec = torch.empty(5)
        mean, var = kernels.stats(x)
        y = kernels.forward(x, vec, vec, vec, "mish", [])
        sums = kernels.backward_reduce(x, x, vec, vec, vec, "mish", [])
    assert mean.shape == var.shape == (5,) and mean.dtype == torch.float32
    assert y.shape == x.shape and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert all(s.shape == (5,) for s in sums)
