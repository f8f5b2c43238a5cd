"""mishkit.convert: module swaps, include/exclude, native revert, torch.fx rewrites, BN fusion."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mishkit
import mishkit.nn as mnn
from mishkit import UntraceableModuleError

from .helpers import PARAMS, assert_same_outputs_and_grads


def stack(act, *, channels=4):
    """conv-BN-act twice, then a head; ``act`` builds the activation modules."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), act(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), act(),
        nn.Conv2d(channels, 2, 1),
    ).double()


class EncoderDecoder(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 6), act())
        self.decoder = nn.Sequential(nn.Linear(6, 6), act(), nn.Linear(6, 3))

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Bottleneck(nn.Module):
    """torchvision-style residual block: one ReLU module called three times."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.stride = 1

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


class CallsFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)) + h.relu()
        return F.relu_(self.fc2(h))


def clone_weights(src, dst):
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize(
    "target, params, torch_act",
    [
        ("mish", {}, nn.Mish),
        ("swish", {}, nn.SiLU),
        ("gelu_tanh", {}, lambda: nn.GELU("tanh")),
        ("leaky_relu", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2)),
        ({"name": "elu", "alpha": 0.5}, {}, lambda: nn.ELU(0.5)),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_converted_matches_torch_reference(target, params, torch_act, training):
    torch.manual_seed(0)
    model = stack(lambda: nn.ReLU(inplace=True)).train(training)
    reference = clone_weights(model, stack(torch_act).train(training))
    mishkit.convert(model, target, **params)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_same_outputs_and_grads(model, reference, x)
    # state_dict round trip both ways: keys unchanged, weights interchangeable
    fresh = mishkit.convert(stack(nn.ReLU).train(training), target, **params)
    clone_weights(reference, fresh)
    assert_same_outputs_and_grads(fresh, reference, x)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_converts_every_default_class_and_preserves_mode_dtype_hooks():
    acts = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(), nn.SiLU(), nn.GELU(), nn.ELU(), nn.Hardswish(),
            nn.Mish(), mnn.SELU()]
    model = nn.Sequential(*acts, nn.Softplus()).double().eval()
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    with pytest.warns(UserWarning, match=r"1 activation or norm site.*\n  9: .*Softplus"):
        model, report = mishkit.convert(model, "mish", report=True)
    assert report.skipped == [("9", "torch.nn.modules.activation.Softplus (softplus) is not in "
                                    "replace")]
    assert all(type(m) is mnn.Mish for m in model[:-1]) and type(model[-1]) is nn.Softplus
    assert not model.training and not any(m.training for m in model)
    model(torch.randn(3, dtype=torch.float64))
    assert calls == [torch.float64]
    handle.remove()
    model(torch.randn(3, dtype=torch.float64))
    assert len(calls) == 1
    assert report.counts["module"] == 9
    assert report.replaced[0][:2] == ("0", "ReLU")


def test_shared_module_stays_shared():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), relu, nn.Sequential(nn.Linear(2, 2), relu))
    mishkit.convert(model, "silu")
    assert model[1] is model[2][1] and isinstance(model[1], mnn.SiLU)


def test_include_exclude_globs():
    model = mishkit.convert(EncoderDecoder(nn.ReLU), "mish", include=["decoder.*"])
    assert [type(m) for m in model.encoder if not isinstance(m, nn.Linear)] == [nn.ReLU] * 2
    assert type(model.decoder[1]) is mnn.Mish
    model, report = mishkit.convert(EncoderDecoder(nn.ReLU), "mish", exclude="encoder.3",
                                    report=True)
    assert (type(model.encoder[1]), type(model.encoder[3])) == (mnn.Mish, nn.ReLU)
    assert ("encoder.3", "outside include/exclude") in report.skipped


def test_revert_with_native_restores_torch_modules():
    torch.manual_seed(0)
    original = EncoderDecoder(lambda: nn.LeakyReLU(0.1)).double()
    model = mishkit.convert(copy.deepcopy(original), "leaky_relu", negative_slope=0.1)
    mishkit.convert(model, "native")
    acts = [m for m in model.modules() if not isinstance(m, (nn.Linear, nn.Sequential))][1:]
    assert acts and all(type(m) is nn.LeakyReLU and m.negative_slope == 0.1 for m in acts)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_same_outputs_and_grads(model, original, x)


def test_native_skips_activations_without_torch_equivalent_loudly():
    model = nn.Sequential(mnn.TanhExp(), mnn.Mish())
    with pytest.warns(UserWarning, match="tanhexp"):
        model, report = mishkit.convert(model, "native", report=True)
    assert type(model[0]) is mnn.TanhExp and type(model[1]) is nn.Mish
    assert report.skipped[0][0] == "0"


def test_idempotent():
    model = mishkit.convert(nn.Sequential(stack(nn.ReLU), Bottleneck().double()), "mish",
                            functional=True, fuse_bn=True)
    before = (repr(model), list(model.state_dict()), model[1].forward.code)
    model, report = mishkit.convert(model, "mish", functional=True, fuse_bn=True, report=True)
    assert report.replaced == []
    assert (repr(model), list(model.state_dict()), model[1].forward.code) == before


# -- torch.fx: functional calls --------------------------------------------------------------------


def test_functional_rewrite_matches_reference_and_keeps_state_dict():
    torch.manual_seed(0)
    model = CallsFunctional().double()
    keys = list(model.state_dict())
    reference = copy.deepcopy(model)
    model, report = mishkit.convert(model, "mish", functional=True, report=True)
    assert report.counts["functional"] == 4 and list(model.state_dict()) == keys
    assert type(model) is CallsFunctional  # converted in place, class kept

    def reference_forward(x):
        h = F.mish(reference.fc1(x))
        h = F.mish(reference.fc2(h)) + F.mish(h)
        return F.mish(reference.fc2(h))

    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_forward(x))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(clone(x), model(x))
    # back to torch functions: still mish, now torch's own
    mishkit.convert(model, "native")
    assert "torch.nn.functional.mish" in model.forward.code
    torch.testing.assert_close(model(x), reference_forward(x))


def test_functional_inplace_call_on_a_shared_input_is_skipped_with_reason():
    class Aliasing(nn.Module):
        def forward(self, x):
            h = x * 2
            F.relu_(h)  # the program reads the mutated h below
            return h + 1

    model, report = mishkit.convert(Aliasing(), "mish", functional=True, report=True)
    assert report.counts["functional"] == 0
    assert "in-place" in report.skipped[0][1]
    x = torch.randn(5)
    torch.testing.assert_close(model(x), F.relu(x * 2) + 1)


class DataDependent(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.sum() > 0 else x


class GoodAndBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.good, self.bad, self.act = CallsFunctional(), DataDependent(), nn.ReLU()

    def forward(self, x):
        return self.act(self.bad(self.good(x)))


def test_strict_untraceable_model_raises_naming_the_part_and_does_not_half_convert():
    model = GoodAndBad()
    with pytest.raises(UntraceableModuleError, match=r"bad \(.*DataDependent\).*strict=True"):
        mishkit.convert(model, "mish", functional=True, strict=True)
    assert type(model.act) is mnn.Mish  # module-level conversion kept
    assert "forward" not in model.good.__dict__  # no functional rewrite anywhere
    assert "forward" not in model.bad.__dict__


def test_untraceable_part_is_routed_at_run_time_and_the_rest_rewritten():
    torch.manual_seed(0)
    model = GoodAndBad().double()
    reference = copy.deepcopy(model)
    model, report = mishkit.convert(model, "mish", functional=True, report=True)
    assert report.counts["functional"] == 4 and report.counts["runtime"] == 1
    assert ("bad", "DataDependent.forward calls relu",
            "mishkit.functional.activation('mish') at run time", "runtime") in report.replaced

    def reference_forward(x):
        net = reference.good
        h = F.mish(net.fc1(x))
        h = F.mish(net.fc2(h)) + F.mish(h)
        h = F.mish(net.fc2(h))
        return F.mish(F.mish(h) if h.sum() > 0 else h)

    for sign in (1, -1):  # both branches of the data-dependent forward
        x = sign * torch.rand(3, 4, dtype=torch.float64)
        torch.testing.assert_close(model(x), reference_forward(x))
    # "fx" alone reports the untraceable part instead of routing it
    _, report = mishkit.convert(GoodAndBad(), "mish", functional="fx", report=True)
    assert report.counts["runtime"] == 0
    assert [p for p, r in report.skipped] == ["bad"]
    assert "relu not converted: torch.fx cannot trace bad" in report.skipped[0][1]


def test_forward_branching_on_training_is_refused_by_fx_and_routed_at_run_time():
    class ModeDependent(nn.Module):
        def forward(self, x):
            return F.relu(x) if self.training else F.leaky_relu(x, 0.5)

    with pytest.raises(UntraceableModuleError, match=r"self\.training"):
        mishkit.convert(ModeDependent(), "mish", functional=True, strict=True)
    model = mishkit.convert(ModeDependent(), "silu", functional=True)
    x = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(model.train()(x), F.silu(x))
    torch.testing.assert_close(model.eval()(x), F.silu(x))


# -- BN fusion -------------------------------------------------------------------------------------


def test_fuse_bn_in_sequential_matches_reference_in_training():
    torch.manual_seed(0)
    model = stack(lambda: nn.ReLU(inplace=True))
    reference = clone_weights(model, stack(nn.Mish))
    keys = list(model.state_dict())
    model, report = mishkit.convert(model, "mish", fuse_bn=True, report=True)
    assert report.counts["fused_bn"] == 2
    assert [type(model[i]) for i in (1, 2, 4, 5)] == [mnn.BatchNormAct2d, nn.Identity] * 2
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_same_outputs_and_grads(model, reference, x)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))


def test_fuse_bn_in_traced_bottleneck_keeps_keys_and_results():
    torch.manual_seed(0)
    block = Bottleneck().double()
    reference = copy.deepcopy(block)
    mishkit.convert(reference, "mish")
    keys = list(block.state_dict())
    block, report = mishkit.convert(block, "mish", fuse_bn=True, report=True)
    assert list(block.state_dict()) == keys and type(block) is Bottleneck and block.stride == 1
    assert all(type(bn) is mnn.BatchNormAct2d for bn in (block.bn1, block.bn2, block.bn3))
    assert report.counts["fused_bn"] == 2 and report.counts["fused_bn_add"] == 1
    assert ("bn3", "BatchNorm2d + add + Mish") in [(p, old) for p, old, _, _ in report.replaced]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_same_outputs_and_grads(block, reference, x)
    # and back: plain BatchNorm2d, the add and torch mish, same keys and results
    mishkit.convert(block, "native")
    assert type(block.bn3) is nn.BatchNorm2d and list(block.state_dict()) == keys
    block.eval(), reference.eval()
    torch.testing.assert_close(block(x), reference(x))


class ResidualEnds(nn.Module):
    """Residual spellings: ``out += r`` (as CSAIL), ``r + bn(x)``, ``torch.add`` + F.relu."""

    def __init__(self, c=3):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn1(x)
        out += x
        out = self.act(out)
        out = self.act(x.tanh() + self.bn2(out))
        return F.relu(torch.add(self.bn3(out), out))


def test_fuse_bn_add_in_every_operand_order_and_spelling():
    torch.manual_seed(0)
    model = ResidualEnds().double()
    reference = copy.deepcopy(model)
    mishkit.convert(reference, "silu", functional=True)
    model, report = mishkit.convert(model, "silu", functional=True, fuse_bn=True, report=True)
    assert report.counts["fused_bn_add"] == 3 and report.counts["fused_bn"] == 0
    assert all(type(bn) is mnn.BatchNormAct2d for bn in (model.bn1, model.bn2, model.bn3))
    assert_same_outputs_and_grads(model, reference, torch.randn(2, 3, 4, 4, dtype=torch.float64))


class NotResidualEnds(nn.Module):
    """bn + add + act shapes that must stay unfused."""

    def __init__(self, c=3):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.offset = nn.Parameter(torch.zeros(c, 1, 1))

    def forward(self, x):
        a = self.bn1(x)
        h = self.act(a + x) + a  # the norm's output is used again
        s = self.bn2(h) + x
        h = self.act(s) * s  # the sum is used again
        return self.act(self.bn3(h) + self.offset)  # a broadcasting parameter


def test_fuse_bn_add_only_when_the_add_is_the_sole_link():
    torch.manual_seed(0)
    model = NotResidualEnds().double()
    model, report = mishkit.convert(model, "mish", fuse_bn=True, report=True)
    assert report.counts["fused_bn_add"] == 0
    assert all(type(bn) is nn.BatchNorm2d for bn in (model.bn1, model.bn2, model.bn3))


def test_fuse_bn_add_on_segmentation_resnet_blocks():
    from segmentation.models.encoders.resnet import BasicBlock, Bottleneck, make_stage

    torch.manual_seed(0)
    stage = nn.Sequential(make_stage(Bottleneck, 8, 2, 2, stride=2),
                          make_stage(BasicBlock, 8, 8, 1)).double()
    reference = mishkit.convert(copy.deepcopy(stage), "mish")
    keys = list(stage.state_dict())
    stage, report = mishkit.convert(stage, "mish", fuse_bn=True, report=True)
    assert report.counts["fused_bn_add"] == 3 and report.counts["fused_bn"] == 5
    assert list(stage.state_dict()) == keys
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert_same_outputs_and_grads(stage, reference, x)
    for first, second in zip(stage.modules(), reference.modules()):
        if isinstance(second, nn.BatchNorm2d):
            torch.testing.assert_close(first.running_var, second.running_var)
    stage.eval(), reference.eval()
    torch.testing.assert_close(stage(x), reference(x))


def test_fuse_sync_batchnorm():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.ReLU()).eval()
    mishkit.convert(model, "mish", fuse_bn=True)
    assert type(model[0]) is mnn.SyncBatchNormAct2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), F.mish(x / (1 + 1e-5) ** 0.5))


def test_native_unfuses_sequential_into_its_identity_slot():
    model = mishkit.convert(stack(nn.ReLU), "silu", fuse_bn=True)
    mishkit.convert(model, "native")
    assert [type(model[i]) for i in (1, 2)] == [nn.BatchNorm2d, nn.SiLU]


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_activation_lists_valid_names_and_native():
    with pytest.raises(ValueError, match=r"unknown activation 'mihs'.*mish.*native"):
        mishkit.convert(nn.ReLU(), "mihs")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_module_is_refused():
    with pytest.raises(TypeError, match="TorchScript"):
        mishkit.convert(torch.jit.script(nn.Sequential(nn.ReLU())), "mish")


def test_nothing_to_convert_warns_with_empty_report():
    with pytest.warns(UserWarning, match="nothing to convert"):
        _, report = mishkit.convert(nn.Linear(2, 2), "mish", report=True)
    assert report.replaced == [] and report.skipped == []


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model": "not a module", "activation": "mish"}, TypeError),
        ({"activation": "mish", "replace": ["ReLU"]}, TypeError),
        ({"activation": "mish", "include": [3]}, TypeError),
        ({"activation": "mish", "backend": "gpu"}, ValueError),
        ({"activation": "leaky_relu", "slope": 0.1}, TypeError),
        ({"activation": {"negative_slope": 0.1}}, ValueError),
        ({"activation": "native", "alpha": 1.0}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    kwargs.setdefault("model", nn.Sequential(nn.ReLU()))
    with warnings.catch_warnings(), pytest.raises(error):
        warnings.simplefilter("ignore")
        mishkit.convert(**kwargs)


def test_report_lists_paths_types_and_counts():
    _, report = mishkit.convert(EncoderDecoder(nn.ReLU), "mish", include="encoder.*", report=True)
    text = str(report)
    assert "encoder.1: ReLU -> Mish()" in text and "decoder.1: skipped" in text
    assert report.counts == {"module": 2, "functional": 0, "runtime": 0, "fused_bn": 0,
                             "fused_bn_add": 0, "skipped": 1}


def test_converting_again_retargets_functional_calls_and_fused_norms():
    torch.manual_seed(0)
    model = nn.Sequential(CallsFunctional(), nn.Unflatten(1, (5, 1, 1)), nn.BatchNorm2d(5),
                          nn.ReLU()).double()
    reference = copy.deepcopy(model)
    mishkit.convert(model, "mish", functional=True, fuse_bn=True)
    model, report = mishkit.convert(model, "silu", functional=True, fuse_bn=True, report=True)
    assert report.counts["functional"] == 4 and report.counts["fused_bn"] == 1
    assert model[2].activation == "silu"

    def reference_forward(x):
        net = reference[0]
        h = F.silu(net.fc1(x))
        h = F.silu(net.fc2(h)) + F.silu(h)
        return F.silu(reference[2](reference[1](F.silu(net.fc2(h)))))

    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_forward(x))


def test_native_keeps_functional_calls_without_torch_function_and_warns():
    model = mishkit.convert(CallsFunctional(), "tanhexp", functional=True)
    with pytest.warns(UserWarning, match="no torch function"):
        _, report = mishkit.convert(model, "native", report=True)
    assert report.counts["functional"] == 0 and len(report.skipped) == 4


def test_fusion_never_bypasses_hooks_and_backend_is_passed_on():
    model = stack(nn.ReLU)
    model[2].register_forward_hook(lambda m, i, o: None)
    model, report = mishkit.convert(model, "mish", fuse_bn=True, backend="torch", report=True)
    assert type(model[1]) is nn.BatchNorm2d
    assert ("1", "norm or activation has hooks") in report.skipped
    assert type(model[4]) is mnn.BatchNormAct2d and model[4].backend == "torch"
    assert model[2].backend == "torch"


# -- every registry activation as a target; third-party classes; what gets reported ---------------


@pytest.mark.parametrize("name", list(mishkit.ACTIVATIONS))
def test_every_registry_activation_is_a_convert_target(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU()).double()
    params = PARAMS.get(name, {})
    model, report = mishkit.convert(model, name, report=True, **params)
    assert report.counts["module"] == 2 and report.skipped == []
    spec = mishkit.ACTIVATIONS[name]
    assert all(isinstance(m, mnn.Activation) and m.activation == name for m in model[1::2])
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = model[2](spec.reference(model[0](x), **{**spec.params, **params}))
    torch.testing.assert_close(model(x), spec.reference(expected, **{**spec.params, **params}))


def test_convert_to_gelu_and_back_to_native():
    model = mishkit.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), "gelu")
    assert type(model[1]) is mnn.GELU and model[1].inplace
    mishkit.convert(model, "native")
    assert type(model[1]) is nn.GELU


class FancyGELU(nn.Module):
    """A third-party-style activation mishkit does not know until it is registered."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


def test_unknown_activation_class_is_reported_until_registered():
    from mishkit.conversion import qualified_name, register_activation
    from mishkit.conversion.mappings import _MODULES

    model = nn.Sequential(nn.Linear(4, 4), FancyGELU())
    with pytest.warns(UserWarning, match="1 activation or norm site"):
        model, report = mishkit.convert(model, "mish", functional=True, report=True)
    name = qualified_name(FancyGELU)
    assert report.skipped == [("1", f"{name} looks like an activation, but mishkit does not "
                                    f"know it: mishkit.conversion.register_activation({name!r}, "
                                    "...) maps it")]
    assert report.counts["functional"] == 0  # never traced: its F.gelu is its own
    try:
        register_activation(name, "gelu_tanh")
        model, report = mishkit.convert(model, "mish", report=True)
        assert type(model[1]) is mnn.Mish and report.replaced[0][1] == "FancyGELU (gelu_tanh)"
        # and by qualified name in replace, without KNOWN_ACTIVATIONS
        model = mishkit.convert(nn.Sequential(FancyGELU(), nn.ReLU()), "silu", replace=[name])
        assert [type(m) for m in model] == [mnn.SiLU, nn.ReLU]
    finally:
        del _MODULES[name]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"qualname": "FancyGELU"}, ValueError, "package.module.ClassName"),
        ({"qualname": "a.B", "activation": "mihs"}, ValueError, "unknown activation"),
        ({"qualname": "a.B", "gate": True, "reason": "x"}, ValueError, "a gate has no"),
    ],
)
def test_register_activation_rejects_bad_entries(kwargs, error, match):
    from mishkit.conversion import register_activation

    with pytest.raises(error, match=match):
        register_activation(**kwargs)


def test_untraceable_module_without_norms_or_calls_is_not_reported():
    class Shapes(nn.Module):  # fx cannot trace it, and it holds nothing to convert
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x)) if x.shape[0] > int(x.sum() * 0) else x

    _, report = mishkit.convert(Shapes(), "mish", functional=True, fuse_bn=True, report=True)
    assert report.skipped == [] and report.counts["module"] == 1


class ConvBN(nn.Module):
    """conv + BN in one child; the block adds and activates (the Hugging Face ResNet shape)."""

    def __init__(self, c=3, act=None):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = act or nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class SplitBlock(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.layer = nn.Sequential(ConvBN(c, nn.ReLU()), ConvBN(c))
        self.shortcut = ConvBN(c)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.layer(x)
        h += self.shortcut(x)
        return self.act(h)


def test_fuse_bn_across_module_boundaries_and_back():
    torch.manual_seed(0)
    block = SplitBlock().double()
    reference = mishkit.convert(copy.deepcopy(block), "mish")
    keys = list(block.state_dict())
    block, report = mishkit.convert(block, "mish", fuse_bn=True, report=True)
    assert ("layer.1.norm", "BatchNorm2d + add + Mish (across modules)") in [
        (p, old) for p, old, _, _ in report.replaced]
    assert report.counts == {"module": 2, "functional": 0, "runtime": 0, "fused_bn": 1,
                             "fused_bn_add": 1, "skipped": 0}
    assert type(block.layer[1].norm) is mnn.BatchNormAct2d and list(block.state_dict()) == keys
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_same_outputs_and_grads(block, reference, x)
    mishkit.convert(block, "native")
    assert type(block.layer[1].norm) is nn.BatchNorm2d and list(block.state_dict()) == keys
    block.eval(), reference.eval()
    torch.testing.assert_close(block(x), reference(x))


def test_fuse_bn_across_modules_refuses_shared_or_hooked_children():
    shared = SplitBlock().double()
    shared.shortcut = shared.layer[1]  # the same module feeds both operands
    _, report = mishkit.convert(shared, "mish", fuse_bn=True, report=True)
    assert report.counts["fused_bn_add"] == 0
    hooked = SplitBlock().double()
    hooked.layer[1].register_forward_hook(lambda m, i, o: None)  # would see the moved BN
    hooked.shortcut.register_forward_hook(lambda m, i, o: None)
    _, report = mishkit.convert(hooked, "mish", fuse_bn=True, report=True)
    assert report.counts["fused_bn_add"] == 0


def test_tracing_records_buffer_updates_instead_of_running_them():
    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls.add_(1)
            return F.relu(x)

    model = mishkit.convert(Counts(), "mish", functional=True)
    assert model.calls.item() == 0  # two traces ran nothing
    x = torch.randn(4)
    torch.testing.assert_close(model(x), F.mish(x))
    assert model.calls.item() == 1
