"""The run-time route: activation calls in forwards fx cannot trace, redirected by a
TorchFunctionMode scoped to the module's own code (eager and torch.compile)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mishkit
from mishkit.conversion import qualified_name, register_activation
from mishkit.conversion.runtime import RuntimeForward

from ..helpers import assert_same_outputs_and_grads


class HardSigmoidGate(nn.Module):
    """A gate whose forward calls F.relu6 (as timm's HardSigmoid): never rewritten inside."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


register_activation(qualified_name(HardSigmoidGate), gate=True)


class Untraceable(nn.Module):
    """Data-dependent control flow, every spelling of the calls, children that must keep theirs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = HardSigmoidGate()
        self.excluded = nn.ReLU()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh())])

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # fx cannot trace this
            h = F.relu(h) + torch.relu(-h)
        else:
            h = h.relu() + F.gelu(h, approximate="tanh")
        h = h * self.gate(h) + self.excluded(h - 1)
        F.relu_(h)  # in place, and h is read again below
        return self.blocks[0](h) + h


def reference(model, x, act):
    h = model.fc(x)
    h = act(h) + act(-h) if h.sum() > 0 else act(h) + act(h)
    h = h * (F.relu6(h + 3.0) / 6.0) + F.relu(h - 1)
    h = act(h)
    return model.blocks[0](h) + h


def converted(target="mish"):
    torch.manual_seed(0)
    model = Untraceable().double()
    with torch.no_grad():  # fc keeps the input's sign, so the test picks the branch
        model.fc.weight.copy_(torch.eye(4) + 0.1 * torch.rand(4, 4))
        model.fc.bias.zero_()
    original = copy.deepcopy(model)
    model, report = mishkit.convert(model, target, functional=True, exclude=["excluded"],
                                    report=True)
    return model, original, report


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_routed_forward_matches_reference_in_both_branches_with_gradients(sign):
    model, original, report = converted()
    assert isinstance(model.forward, RuntimeForward)
    assert report.counts["runtime"] == 1 and report.counts["functional"] == 0
    assert ("excluded", "outside include/exclude") in report.skipped
    x = sign * (torch.rand(3, 4, dtype=torch.float64) + 0.5)
    assert_same_outputs_and_grads(model, lambda t: reference(original, t, F.mish), x,
                                  original.parameters())


def test_routed_forward_under_torch_compile_fullgraph():
    model, original, _ = converted("silu")
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(original, x, F.silu)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)

    class Traceable(nn.Module):  # a branch-free forward can be captured as one graph
        def forward(self, x):
            h = F.relu(x) + x.relu()
            F.relu(h, inplace=True)
            return torch.relu(h) * 2

    routed = mishkit.convert(Traceable(), "mish", functional="runtime")
    torch._dynamo.reset()
    full = torch.compile(routed, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = full(x)
    expected = F.mish(F.mish(F.mish(x) + F.mish(x))) * 2
    torch.testing.assert_close(y, expected)
    (grad,) = torch.autograd.grad(y.sum(), x)
    (grad_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, grad_ref)

    class InPlaceBuiltin(nn.Module):  # compile calls torch.relu_ without the mode: run eagerly
        def forward(self, x):
            h = x * 2
            F.relu_(h)
            return h

    routed = mishkit.convert(InPlaceBuiltin(), "mish", functional="runtime")
    assert routed.forward.eager_under_compile
    torch._dynamo.reset()
    x = torch.randn(5)
    torch.testing.assert_close(torch.compile(routed, backend="aot_eager")(x), F.mish(x * 2))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        torch.compile(routed, fullgraph=True, backend="aot_eager")(x)


def test_inplace_call_without_grad_writes_into_its_input():
    class InPlace(nn.Module):
        def forward(self, x):
            if x.sum() > -1e9:
                F.relu(x, inplace=True)
            return x

    model = mishkit.convert(InPlace(), "mish", functional=True)
    x = torch.randn(6)
    expected = F.mish(x)
    with torch.no_grad():
        y = model(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


def test_routed_module_pickles_deepcopies_retargets_and_reverts():
    model, original, _ = converted()
    x = torch.rand(3, 4, dtype=torch.float64) + 0.5
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert isinstance(clone.forward, RuntimeForward) and clone.forward.owner is clone
        torch.testing.assert_close(clone(x), model(x))
    _, report = mishkit.convert(model, "mish", functional=True, exclude=["excluded"],
                                report=True)
    assert report.replaced == []  # converting again changes nothing
    _, report = mishkit.convert(model, "silu", functional=True, exclude=["excluded"],
                                report=True)
    assert report.counts["runtime"] == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(original, x, F.silu))
    mishkit.convert(model, "native")
    assert "forward" not in model.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(original, x, F.relu))


def test_runtime_mode_routes_traceable_forwards_without_tracing():
    class Calls(nn.Module):
        def forward(self, x):
            return F.silu(x) * torch.relu(x)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Calls()

        def forward(self, x):
            return self.inner(x) + 1

    model, report = mishkit.convert(Wrapper(), "mish", functional="runtime", report=True)
    assert [p for p, *_, kind in report.replaced if kind == "runtime"] == ["inner"]
    assert "forward calls relu, silu" in report.replaced[0][1]
    x = torch.randn(7)
    torch.testing.assert_close(model(x), F.mish(x) * F.mish(x) + 1)


def test_fx_rewrite_replaces_an_earlier_route():
    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.relu(self.fc(x))

    model = mishkit.convert(Calls(), "mish", functional="runtime")
    assert isinstance(model.forward, RuntimeForward) and model.fc._forward_pre_hooks
    model = mishkit.convert(model, "silu", functional=True)
    assert isinstance(model.forward, mishkit.conversion.fx.RewrittenForward)
    assert not model.fc._forward_pre_hooks and not model.fc._forward_hooks
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), F.silu(model.fc(x)))


def test_functional_value_is_checked():
    with pytest.raises(ValueError, match="functional must be one of"):
        mishkit.convert(nn.ReLU(), "mish", functional="trace")
