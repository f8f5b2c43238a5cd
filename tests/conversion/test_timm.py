"""timm's activation and norm-act modules, through stand-ins of the same qualified names.

timm imports torchvision, which cannot be installed beside the pinned torch here, so these
classes reproduce timm 1.0's (``timm.layers.activations``, ``timm.layers.norm_act``) under
their exact module path and class name; mishkit matches by that name and never imports timm.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mishkit
import mishkit.nn as mnn
from mishkit.conversion import identify

ACTIVATIONS = "timm.layers.activations"


def timm_name(module: str, name: str):
    """Give a stand-in class or function timm's qualified name."""

    def rename(obj):
        obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
        return obj

    return rename


# -- timm.layers.activations, formulas as timm 1.0 writes them -------------------------------------
@timm_name(ACTIVATIONS, "swish")
def swish(x, inplace: bool = False):
    return x.mul_(x.sigmoid()) if inplace else x.mul(x.sigmoid())


@timm_name(ACTIVATIONS, "hard_sigmoid")
def hard_sigmoid(x, inplace: bool = False):
    return F.relu6(x + 3.0) / 6.0


class _Inplace(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace


@timm_name(ACTIVATIONS, "Swish")
class Swish(_Inplace):
    def forward(self, x):
        return swish(x, self.inplace)


@timm_name(ACTIVATIONS, "Mish")
class Mish(_Inplace):
    def forward(self, x):
        return x.mul(F.softplus(x).tanh())


@timm_name(ACTIVATIONS, "GELU")
class GELU(_Inplace):
    def forward(self, x):
        return F.gelu(x)


@timm_name(ACTIVATIONS, "GELUTanh")
class GELUTanh(_Inplace):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


@timm_name(ACTIVATIONS, "QuickGELU")
class QuickGELU(_Inplace):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@timm_name(ACTIVATIONS, "HardSwish")
class HardSwish(_Inplace):
    def forward(self, x):
        return x.mul(F.relu6(x + 3.0).div_(6.0))


@timm_name(ACTIVATIONS, "HardMish")
class HardMish(_Inplace):
    def forward(self, x):
        return 0.5 * x * (x + 2).clamp(min=0, max=2)


@timm_name(ACTIVATIONS, "HardSigmoid")
class HardSigmoid(_Inplace):
    def forward(self, x):
        return hard_sigmoid(x, self.inplace)


@timm_name(ACTIVATIONS, "PReLU")
class PReLU(nn.PReLU):
    def __init__(self, num_parameters: int = 1, init: float = 0.25, inplace: bool = False):
        super().__init__(num_parameters=num_parameters, init=init)

    def forward(self, x):
        return F.prelu(x, self.weight)


@timm_name("timm.layers.activations_me", "SwishMe")
class SwishMe(_Inplace):
    def forward(self, x):
        return x.mul(torch.sigmoid(x))


@timm_name("timm.layers.norm_act", "BatchNormAct2d")
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BN subclass with ``drop`` and ``act`` children (its forward, condensed)."""

    def __init__(self, num_features, apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats
                         else None,
                         self.running_var if not self.training or self.track_running_stats
                         else None, self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


TIMM_ACTIVATIONS = {Swish: "silu", Mish: "mish", GELU: "gelu", GELUTanh: "gelu_tanh",
                    QuickGELU: "quick_gelu", HardSwish: "hardswish", HardMish: "hardmish",
                    SwishMe: "silu"}


@pytest.mark.parametrize("cls", list(TIMM_ACTIVATIONS), ids=lambda c: c.__qualname__)
def test_timm_activation_is_mapped_to_the_registry_formula_it_computes(cls):
    site = identify(cls())
    assert site.kind == "activation" and site.convertible
    assert site.known.activation == TIMM_ACTIVATIONS[cls]
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    spec = mishkit.ACTIVATIONS[site.known.activation]
    torch.testing.assert_close(cls()(x), spec.reference(x), rtol=1e-9, atol=1e-12)


def test_timm_modules_are_replaced_whole_gates_kept_learned_reported():
    model = nn.Sequential(*(cls(inplace=True) for cls in TIMM_ACTIVATIONS), HardSigmoid(),
                          PReLU()).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    gate_before = HardSigmoid()(x)
    with pytest.warns(UserWarning, match=r"(?s)1 activation or norm site.*PReLU.*learned slope"):
        model, report = mishkit.convert(model, "mish", functional=True, report=True)
    assert all(type(m) is mnn.Mish for m in model[:len(TIMM_ACTIVATIONS)])
    assert model[0].inplace  # the timm module's inplace flag carries over
    assert type(model[-2]) is HardSigmoid and type(model[-1]) is PReLU
    assert report.counts["functional"] == 0  # nothing inside a composite was rewritten
    assert report.skipped == [(str(len(model) - 1), "timm.layers.activations.PReLU: it has a "
                               "learned slope that the replacement would drop")]
    torch.testing.assert_close(model[-2](x), gate_before)
    assert report.replaced[0][1] == "Swish (silu)"


class CallsTimmFunctions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return swish(h) * hard_sigmoid(h) + F.relu(h)


def test_timm_functions_stay_one_call_and_are_rewritten_whole():
    torch.manual_seed(0)
    model = CallsTimmFunctions().double()
    reference = copy.deepcopy(model)
    model, report = mishkit.convert(model, "mish", functional=True, report=True)
    described = [old for _, old, _, kind in report.replaced if kind == "functional"]
    assert described == ["timm.layers.activations.swish", "torch.nn.functional.relu"]
    x = torch.randn(3, 4, dtype=torch.float64)
    h = reference.fc(x)
    torch.testing.assert_close(model(x), F.mish(h) * (F.relu6(h + 3) / 6) + F.mish(h))


def test_runtime_route_refuses_forwards_calling_timm_composites():
    class Untraceable(CallsTimmFunctions):
        def forward(self, x):
            h = self.fc(x)
            if h.sum() > 0:
                h = -h
            return F.relu(h) * hard_sigmoid(h)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = mishkit.convert(Untraceable(), "mish", functional=True, report=True)
    assert report.counts["runtime"] == 0 and "forward" not in model.__dict__
    ((path, reason),) = report.skipped
    assert path == "" and "would also rewrite inside timm.layers.activations.hard_sigmoid" in reason


class EfficientBlock(nn.Module):
    """efficientnet-style: norm-act after each conv, a hard-sigmoid SE gate, linear bottleneck."""

    def __init__(self, act_layer, c=4):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = BatchNormAct2d(2 * c, act_layer=act_layer)
        self.conv_dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.bn2 = BatchNormAct2d(2 * c, act_layer=act_layer)
        self.se_reduce, self.se_expand = nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, 2 * c, 1)
        self.gate = HardSigmoid()
        self.conv_pwl = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn3 = BatchNormAct2d(c, apply_act=False)
        self.act = act_layer()

    def forward(self, x):
        h = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        h = h * self.gate(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return self.act(self.bn3(self.conv_pwl(h)) + x)  # a residual end through timm's BN


def test_timm_norm_act_fuses_and_matches_a_mish_configured_block_in_training():
    torch.manual_seed(0)
    model = EfficientBlock(Swish).double()
    reference = EfficientBlock(nn.Mish).double()
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    model, report = mishkit.convert(model, "mish", functional=True, fuse_bn=True, report=True)
    assert [type(m) for m in (model.bn1, model.bn2, model.bn3)] == [mnn.BatchNormAct2d] * 3
    assert report.counts["fused_bn"] == 2 and report.counts["fused_bn_add"] == 1
    assert list(model.state_dict()) == keys and type(model.gate) is HardSigmoid

    def reference_forward(block, x):  # the SE's F.relu is a functional call: mish too
        h = block.bn2(block.conv_dw(block.bn1(block.conv_pw(x))))
        s = block.se_expand(F.mish(block.se_reduce(h.mean((2, 3), keepdim=True))))
        return block.act(block.bn3(block.conv_pwl(h * block.gate(s))) + x)

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = model(x1), reference_forward(reference, x2)
    torch.testing.assert_close(y, y_ref)
    y.backward(torch.ones_like(y))
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(x1.grad, x2.grad)
    for (key, value), ref in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, ref, msg=key)  # running statistics too

    # back to timm's own classes, with torch activations inside, same keys and results
    mishkit.convert(model, "native")
    assert [type(m) for m in (model.bn1, model.bn2, model.bn3)] == [BatchNormAct2d] * 3
    assert type(model.bn1.act) is nn.Mish and type(model.bn3.act) is nn.Identity
    assert list(model.state_dict()) == keys
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference_forward(reference, x))


def test_timm_norm_act_with_a_drop_layer_or_unconverted_act_is_reported():
    model = nn.Sequential(BatchNormAct2d(3, act_layer=Swish, drop_layer=nn.Dropout),
                          BatchNormAct2d(3, act_layer=nn.Tanh))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = mishkit.convert(model, "mish", fuse_bn=True, report=True)
    assert [type(m) for m in model] == [BatchNormAct2d] * 2
    assert report.skipped == [
        ("0", "BatchNormAct2d not fused: its Dropout sits between the norm and its activation"),
        ("1", "BatchNormAct2d not fused: its activation Tanh was not converted"),
    ]
