"""Every activation on every backend available for CPU tensors (C++ cpu, Triton interpreted, torch),
checked against independent references: the float64 registry formulas, torch's native ops,
numerical gradients (gradcheck) and hand-picked edge values."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import mishkit
import mishkit.functional as MF
from mishkit.registry import ACTIVATIONS

from .helpers import PARAMS, SPECIAL, TOLERANCE, assert_close, reference, reference_grad

BACKENDS = mishkit.available_backends("cpu")
NAMES = list(ACTIVATIONS)
KINKS = (0.0, 3.0, -3.0, -2.0, 2.5)  # non-smooth points (2.5: softplus threshold 5 / beta 2)


def grid(dtype):
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64),
                        torch.linspace(-12, 12, 97, dtype=torch.float64),
                        torch.randn(64, generator=gen, dtype=torch.float64) * 4])
    return values.to(dtype)


def away_from_kinks(x):
    keep = torch.ones_like(x, dtype=torch.bool)
    for kink in KINKS:
        keep &= (x - kink).abs() > 1e-3
    return x[keep]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_match_float64_reference(name, dtype, backend):
    params = PARAMS.get(name, {})
    x = grid(dtype).requires_grad_(True)
    y = MF.activation(x, name, backend=backend, **params)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y.detach(), reference(name, x.detach(), **params), dtype)

    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert_close(grad_x, reference_grad(name, x.detach(), grad, **params), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck_float64(name, backend):
    params = PARAMS.get(name, {})
    x = away_from_kinks(torch.randn(24, dtype=torch.float64, generator=torch.Generator()
                                    .manual_seed(2)) * 3).requires_grad_(True)

    def fn(t):
        return MF.activation(t, name, backend=backend, **params)

    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_tangent_is_the_derivative_times_the_tangent(name, dtype, backend):
    params = PARAMS.get(name, {})
    x = grid(dtype)  # no requires_grad: forward mode alone
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    with fwAD.dual_level():
        y = MF.activation(fwAD.make_dual(x, tangent), name, backend=backend, **params)
        y_primal, y_tangent = fwAD.unpack_dual(y)
    assert y_tangent is not None, "the tangent was dropped"
    assert_close(y_primal, reference(name, x, **params), dtype)
    assert_close(y_tangent, reference_grad(name, x, tangent, **params), dtype)
    jvp = torch.func.jvp(lambda t: MF.activation(t, name, backend=backend, **params),
                         (x,), (tangent,))[1]
    assert_close(jvp, reference_grad(name, x, tangent, **params), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_a_forward_mode_tangent(backend):
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(8), torch.randn(8))
        with pytest.raises(RuntimeError, match="forward-mode tangent"):
            MF.relu(x, inplace=True, backend=backend)


NATIVE = [name for name, spec in ACTIVATIONS.items() if spec.native is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NATIVE)
def test_matches_torch_native_op(name, backend):
    spec, params = ACTIVATIONS[name], PARAMS.get(name, {})
    x = grid(torch.float32)
    # torch's native self-gated ops give nan at -inf (documented), and its composite gelu_tanh /
    # hardswish overflow where |x| ~ 1e13 / 1e38: compare where both sides mean the same
    x = x[x.abs() <= 1e4]
    x_ours, x_native = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours = MF.activation(x_ours, name, backend=backend, **params)
    y_native = spec.native(x_native, **params)
    # both sides are float32 kernels ~1e-6 off the float64 truth (torch's gelu-tanh backward
    # measured 1.03e-6 here), so allow the sum of two such errors
    torch.testing.assert_close(y_ours, y_native, rtol=1e-5, atol=2.5e-6)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y_ours.backward(grad)
    y_native.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_native.grad, rtol=1e-5, atol=2.5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_only_the_input(backend):
    saved = []
    x = torch.randn(4, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MF.mish(x, backend=backend)
    assert len(saved) == 1
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape
    y.sum().backward()


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backward_is_one_fused_op(backend):
    x = torch.randn(64, requires_grad=True)
    y = MF.silu(x, backend=backend)
    grad = torch.randn(64)
    with OpLog() as log:
        torch.autograd.grad(y, x, grad)  # not .backward(): AccumulateGrad would log a detach
    assert [op for op in log.ops if "mishkit" in op] == [
        "mishkit.act_backward" if backend == "cpu" else "mishkit.triton_act_backward"
    ]
    assert len(log.ops) == 1, log.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mish", "softplus", "hardswish"])
def test_inplace(name, backend):
    x = torch.randn(3, 7)
    expected = MF.activation(x, name, backend=backend)
    x_inplace = x.clone()
    with torch.no_grad():
        out = MF.activation(x_inplace, name, inplace=True, backend=backend)
    assert out.data_ptr() == x_inplace.data_ptr()
    torch.testing.assert_close(x_inplace, expected)

    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"inplace=True.*autograd needs the input"):
        MF.activation(leaf * 2, name, inplace=True, backend=backend)


INPLACE_OPS = {"cpu": "act_forward_", "triton": "triton_act_forward_"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_bumps_the_version_counter(backend):
    # autograd saved x for w's gradient; overwriting x afterwards must make backward raise, as
    # torch's own F.silu(x, inplace=True) does, instead of silently using silu(x) as the input
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    x = torch.tensor([1.0, -1.0])
    y = x * w
    version = x._version
    with torch.no_grad():
        MF.silu(x, inplace=True, backend=backend)
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in INPLACE_OPS])
def test_inplace_op_follows_torch_inplace_semantics(backend):
    op = getattr(torch.ops.mishkit, INPLACE_OPS[backend])
    x = torch.randn(6)
    for mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):  # like torch.relu_
        version, native = x._version, x.clone()
        with mode():
            assert op(x, "relu", []) is x
            torch.relu_(native)
        assert x._version - version == 1 and torch.equal(x, native)
    leaf = torch.randn(3, requires_grad=True)
    for tracked in (leaf, leaf * 2):  # f'(x) needs the x the op would overwrite
        with pytest.raises(RuntimeError, match=r"x requires grad, and the in-place activation"):
            op(tracked, "mish", [])
    with torch.no_grad():
        op(leaf * 2, "mish", [])  # not recorded: allowed
    with torch.inference_mode():
        inference = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"(?i)in-?place update to (an )?inference tensor"):
        op(inference, "relu", [])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in INPLACE_OPS])
@pytest.mark.parametrize("name", ["mish", "softplus", "leaky_relu"])
def test_opcheck_inplace(name, backend):
    # aot_dispatch is left out: functionalization rejects custom ops returning an alias of their
    # input (`-> Tensor(a!)`); under torch.compile the dispatch writes back an out-of-place result
    op = getattr(torch.ops.mishkit, INPLACE_OPS[backend])
    params = list(ACTIVATIONS[name].bind((), PARAMS.get(name, {})))
    x = away_from_kinks(torch.randn(40, generator=torch.Generator().manual_seed(6)))
    torch.library.opcheck(op, (x, name, params),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_threshold_may_be_infinite_like_torch(backend):
    x = torch.linspace(-30, 30, 121, dtype=torch.float64).requires_grad_(True)
    for threshold in (math.inf, -math.inf):
        y = MF.softplus(x, 2.0, threshold=threshold, backend=backend)
        want = torch.nn.functional.softplus(x, 2.0, threshold)  # +inf: never x; -inf: always x
        torch.testing.assert_close(y, want)
        (grad,) = torch.autograd.grad(y.sum(), x)
        (want_grad,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(grad, want_grad)
    # no overflow where beta x passes exp's range in float32 (torch's float32 kernel gives inf)
    big = torch.tensor([89.0, 1e4, math.inf])
    assert torch.equal(MF.softplus(big, threshold=math.inf, backend=backend), big)
    with pytest.raises(ValueError, match="'threshold' must be finite or"):
        MF.softplus(x, threshold=math.nan, backend=backend)
    with pytest.raises(ValueError, match="'beta' must be finite"):
        MF.softplus(x, beta=math.inf, backend=backend)


def layouts():
    base = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    return {
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 3),
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3),
        "sliced": base[:, ::2, 1:, ::3],
        "expanded": torch.randn(1, 5).expand(4, 5),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(layouts()))
def test_shapes_and_memory_formats(layout, backend):
    x = layouts()[layout].detach().requires_grad_(True)
    y = MF.gelu(x, backend=backend)
    assert y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.stride() == x.stride()
    torch.testing.assert_close(y, reference("gelu", x.detach()).float(), rtol=1e-5, atol=1e-6)
    grad = torch.ones_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(grad_x, reference_grad("gelu", x.detach(), grad).float(),
                               rtol=1e-5, atol=1e-6)


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([1e4, -1e4, 1e-40, -1e-40, 0.0, -3.0, 3.0, -2.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), transpose=st.booleans())
def test_property_any_shape_stride_dtype_value(backend, data, name, dtype, shape, transpose):
    n = math.prod(shape)
    values = torch.tensor(data.draw(st.lists(FLOATS, min_size=n, max_size=n)), dtype=torch.float64)
    x = values.reshape(shape).to(dtype)
    if transpose and x.dim() > 1:
        x = x.transpose(0, -1)
    y = MF.activation(x, name, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, reference(name, x), dtype)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_rejects_non_float_dtypes(dtype):
    x = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"mishkit\.mish.*{str(dtype).split('.')[-1]}"):
        MF.mish(x)


def test_bad_arguments():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="unexpected parameter 'gamma'"):
        MF.softplus(x, gamma=2.0)
    with pytest.raises(TypeError, match="takes 2 parameter"):
        MF.softplus(x, 1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="must be finite"):
        MF.elu(x, alpha=math.nan)
    with pytest.raises(ValueError, match=r"unknown activation 'mesh'.*mish.*swish"):
        MF.activation(x, "mesh")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        MF.mish(x, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        MF.mish(x, backend="cuda")
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        MF.mish([1.0, 2.0])


def test_aliases_and_signatures():
    assert MF.swish is MF.silu and MF.gelu_erf is MF.gelu
    x = torch.randn(5)
    torch.testing.assert_close(MF.softplus(x, 2.0, 5.0), MF.softplus(x, beta=2.0, threshold=5.0))
    torch.testing.assert_close(MF.activation(x, "Swish"), torch.nn.functional.silu(x))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            h = MF.mish(self.fc1(x), backend=backend)
            return MF.softplus(self.fc2(MF.gelu_tanh(h, backend=backend)), 2.0, backend=backend)

    torch._dynamo.reset()
    net = Net()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8, requires_grad=True)
    y_eager, y_compiled = net(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (g_compiled,) = torch.autograd.grad(y_compiled.sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mishkit._C is not built")
def test_torch_compile_inductor_with_extension_ops():
    torch._dynamo.reset()
    fn = torch.compile(lambda t: MF.mish(t * 2, backend="cpu") + 1, fullgraph=True)
    x = torch.randn(33)
    torch.testing.assert_close(fn(x), torch.nn.functional.mish(x * 2) + 1, rtol=1e-5, atol=1e-6)


OPS = {"cpu": ("act_forward", "act_backward"),
       "triton": ("triton_act_forward", "triton_act_backward")}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in OPS])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, backend):
    forward, backward = (getattr(torch.ops.mishkit, op) for op in OPS[backend])
    params = list(ACTIVATIONS[name].bind((), PARAMS.get(name, {})))
    x = away_from_kinks(torch.randn(40, generator=torch.Generator().manual_seed(5)))
    torch.library.opcheck(forward, (x.requires_grad_(True), name, params))
    torch.library.opcheck(backward, (torch.randn_like(x), x.detach(), name, params))
