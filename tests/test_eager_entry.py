"""The extension's eager entry (``mishkit._C.act_forward_eager``, which ``mishkit.ops.apply`` tries
first): the plain call gives exactly what ``torch.ops.mishkit.act_forward`` gives, anything it does
not serve comes back as None, and what torch.ops honours (``__torch_function__`` overrides and
modes, dispatch modes, autograd, the JIT tracer, in-place semantics) still holds for the public
API whichever path a call takes."""

from typing import ClassVar

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mishkit.functional as MF
import mishkit.nn as mnn
from mishkit.backends import extension

from .helpers import DTYPES, assert_close, reference

eager = extension.EAGER_FORWARD
pytestmark = pytest.mark.skipif(eager is None, reason=f"extension not built: {extension.REASON}")


def _x(dtype=torch.float32, n=257):
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "params"),
                         [("mish", ()), ("leaky_relu", (0.2,)), ("softplus", (2.0, 5.0))])
def test_plain_call_equals_the_torch_ops_call(name, params, dtype):
    x = _x(dtype)
    y = eager(x, name, params, False, "auto")
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, torch.ops.mishkit.act_forward(x, name, list(params)))
    assert torch.equal(eager(x, name, params, False, "cpu"), y)


class Tagged(torch.Tensor):
    """A subclass that overrides __torch_function__ (as tensor wrappers in the wild do)."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


class OverloadLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(str(func))
        return func(*args, **(kwargs or {}))


DECLINED = {
    "not a tensor": lambda: ([1.0, 2.0], "mish", (), False, "auto"),
    "a subclass": lambda: (_x().as_subclass(Tagged), "mish", (), False, "auto"),
    "integer dtype": lambda: (torch.arange(4), "mish", (), False, "auto"),
    "meta device": lambda: (torch.empty(4, device="meta"), "mish", (), False, "auto"),
    "the torch backend": lambda: (_x(), "mish", (), False, "torch"),
    "the triton backend": lambda: (_x(), "mish", (), False, "triton"),
    "cuda backend, CPU tensor": lambda: (_x(), "mish", (), False, "cuda"),
    "an unknown backend": lambda: (_x(), "mish", (), False, "fast"),
    "params as a list": lambda: (_x(), "leaky_relu", [0.2], False, "auto"),
    "an int param": lambda: (_x(), "leaky_relu", (1,), False, "auto"),
    "too many params": lambda: (_x(), "softplus", (1.0, 2.0, 3.0), False, "auto"),
    "name not a str": lambda: (_x(), b"mish", (), False, "auto"),
    "in place on a tracked tensor": lambda: (_x().requires_grad_(), "mish", (), True, "auto"),
}


@pytest.mark.parametrize("case", DECLINED)
def test_declines_what_the_python_path_must_handle(case):
    assert eager(*DECLINED[case]()) is None


def test_declines_under_a_torch_function_mode():
    with OverloadLog():
        assert eager(_x(), "mish", (), False, "auto") is None


def test_subclass_override_sees_the_op_and_keeps_its_type():
    Tagged.seen = []
    x = _x().as_subclass(Tagged)
    y = MF.mish(x)
    assert type(y) is Tagged
    assert any("mishkit.act_forward" in func for func in Tagged.seen), Tagged.seen
    assert_close(y.as_subclass(torch.Tensor), reference("mish", _x()), torch.float32)


def test_torch_function_mode_sees_the_op():
    with OverloadLog() as log:
        y = MF.mish(_x())
    assert any("mishkit.act_forward" in func for func in log.funcs), log.funcs
    assert_close(y, reference("mish", _x()), torch.float32)


class DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_plain_call():
    x = _x()
    assert eager(x, "mish", (), False, "auto") is not None  # the plain call: the eager entry
    with DispatchLog() as log:
        MF.mish(x)
        MF.relu(x.clone(), inplace=True)
    assert [op for op in log.ops if "mishkit" in op] == [
        "mishkit.act_forward.default", "mishkit.act_forward_.default"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_through_the_plain_call(dtype):
    x = _x(dtype).requires_grad_()
    y = MF.mish(x)
    assert y.requires_grad and type(y.grad_fn).__name__ != "NoneType"
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    expected = torch.ops.mishkit.act_backward(grad, x.detach(), "mish", [])
    assert torch.equal(dx, expected)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(MF.mish, (x[:16].detach().requires_grad_(),))


def test_inplace_returns_x_writes_it_and_bumps_its_version():
    x = _x()
    expected = reference("relu", x)
    version = x._version
    assert MF.relu(x, inplace=True) is x
    assert x._version == version + 1
    assert_close(x, expected, torch.float32)


def test_inplace_on_a_tracked_tensor_is_still_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="autograd needs the input for backward"):
        MF.mish(_x().requires_grad_(), inplace=True)


def test_inference_mode_tensor_in_place_outside_inference_mode_is_torchs_error():
    with torch.inference_mode():
        x = _x()
        MF.relu(x, inplace=True)  # allowed inside
    with pytest.raises(RuntimeError, match=r"[Ii]nference tensor"):
        MF.relu(x, inplace=True)


def test_kernel_errors_reach_python_as_runtime_errors():
    overlapping = torch.zeros(1).expand(4)
    with pytest.raises(RuntimeError, match="single memory location"):
        MF.relu(overlapping, inplace=True)


def test_parameters_take_the_plain_call():
    weight = torch.nn.Parameter(_x())
    assert eager(weight, "mish", (), False, "auto") is not None
    y = MF.mish(weight)
    assert y.requires_grad and type(y) is torch.Tensor


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_records_the_op():
    traced = torch.jit.trace(mnn.Mish(), _x())
    assert "mishkit::act_forward" in str(traced.graph)
    x = torch.randn(33)
    assert torch.equal(traced(x), MF.mish(x))


def test_graph_node_frees_x_after_backward_and_checks_its_version():
    x = _x(torch.float64).requires_grad_()
    y = MF.mish(x)
    assert y.grad_fn.name() == "mishkit::ActBackward"
    assert y.grad_fn.next_functions[0][0].variable is x
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()  # retained: runs again
    assert torch.equal(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    leaf = _x().requires_grad_()
    z = leaf * 1
    out = MF.mish(z)
    z.add_(1)  # overwrites the input the node saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
