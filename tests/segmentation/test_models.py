"""CSAIL scene-parsing models: checkpoint layout, shapes, parameter counts, loading, conversion.

The expected layout comes from tests/segmentation/data/csail_modules.json, derived from the CSAIL
reference code (see its "source" field), not from the code under test.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from segmentation.models import (
    CSAIL_CONFIGS,
    DECODERS,
    DEEP_SUPERVISION_WEIGHT,
    ENCODERS,
    CheckpointMismatchError,
    SegmentationOutput,
    build_decoder,
    build_encoder,
    build_model,
    load_weights,
)

from .reference import csail_style

MANIFEST = json.loads((Path(__file__).parent / "data" / "csail_modules.json").read_text())
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------- reference layout
def expand(modules: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """state_dict keys → shapes implied by the manifest's per-module descriptions."""
    keys = {}
    for path, text in modules.items():
        kind, dims, *flags = text.split()
        shape = tuple(int(d) for d in dims.split("x"))
        if kind == "bn":
            for name in BN_KEYS:
                keys[f"{path}.{name}"] = () if name == "num_batches_tracked" else shape
        else:  # conv / linear: weight, optional bias
            keys[f"{path}.weight"] = shape
            if kind == "linear" or "bias" in flags:
                keys[f"{path}.bias"] = shape[:1]
    return keys


def reference_parameter_count(modules: dict[str, str]) -> int:
    return sum(
        torch.Size(shape).numel()
        for key, shape in expand(modules).items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def describe(module: nn.Module) -> str | None:
    """Our modules in the manifest's notation (geometry included: stride, dilation, groups)."""
    if isinstance(module, nn.Conv2d):
        o, i, kh, kw = module.weight.shape
        text = f"conv {o}x{i}x{kh}x{kw}"
        text += " bias" if module.bias is not None else ""
        text += f" stride{module.stride[0]}" if module.stride != (1, 1) else ""
        text += f" dilation{module.dilation[0]}" if module.dilation != (1, 1) else ""
        expected_padding = (kh // 2 * module.dilation[0], kw // 2 * module.dilation[1])
        text += f" padding{module.padding[0]}" if module.padding != expected_padding else ""
        text += f" groups{module.groups}" if module.groups != 1 else ""
        return text
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"bn {module.num_features}"
    return None


def layout(module: nn.Module) -> dict[str, str]:
    return {name: text for name, m in module.named_modules() if (text := describe(m))}


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@functools.cache
def encoder(arch: str) -> nn.Module:
    return build_encoder(arch)


# ------------------------------------------------------------------ checkpoint compatibility
@pytest.mark.parametrize("arch", sorted(MANIFEST["encoders"]))
def test_encoder_matches_csail_layout(arch):
    expected = MANIFEST["encoders"][arch]
    ours = encoder(arch)
    assert layout(ours) == expected
    assert shapes(ours) == expand(expected)


def test_every_encoder_is_covered_by_the_manifest():
    assert set(ENCODERS) == set(MANIFEST["encoders"])
    assert {name.split("/")[0] for name in MANIFEST["decoders"]} == set(DECODERS)


@pytest.mark.parametrize("entry", sorted(MANIFEST["decoders"]))
def test_decoder_matches_csail_layout(entry):
    arch, fc = entry.split("/fc_dim=")
    fc = int(fc)
    in_channels = encoder("mobilenetv2dilated").out_channels if fc == 320 else None
    ours = build_decoder(arch, 150, fc, in_channels=in_channels)
    assert layout(ours) == MANIFEST["decoders"][entry]
    assert shapes(ours) == expand(MANIFEST["decoders"][entry])


def test_c1_parameter_count_by_hand():
    # hrnetv2-c1 decoder: 3×3 conv 720→180 (no bias), BN(180), 1×1 conv 180→150 with bias.
    expected = 720 * 180 * 9 + 2 * 180 + 180 * 150 + 150
    assert sum(p.numel() for p in build_decoder("c1", 150, 720).parameters()) == expected


CSAIL_DECODER_ENTRY = {  # manifest decoder entry of each CSAIL configuration
    "mobilenetv2dilated-c1_deepsup": "c1_deepsup/fc_dim=320",
    "resnet18dilated-ppm_deepsup": "ppm_deepsup/fc_dim=512",
    "resnet50dilated-ppm_deepsup": "ppm_deepsup/fc_dim=2048",
    "resnet101dilated-ppm_deepsup": "ppm_deepsup/fc_dim=2048",
    "resnet50-upernet": "upernet/fc_dim=2048",
    "resnet101-upernet": "upernet/fc_dim=2048",
    "hrnetv2-c1": "c1/fc_dim=720",
}


@pytest.mark.parametrize("config", sorted(CSAIL_CONFIGS))
def test_parameter_counts_match_csail(config):
    enc, dec = CSAIL_CONFIGS[config]
    model = build_model(enc, dec)
    expected_enc = reference_parameter_count(MANIFEST["encoders"][enc])
    expected_dec = reference_parameter_count(MANIFEST["decoders"][CSAIL_DECODER_ENTRY[config]])
    assert sum(p.numel() for p in model.encoder.parameters()) == expected_enc
    assert sum(p.numel() for p in model.decoder.parameters()) == expected_dec


def test_csail_checkpoint_file_loads_and_round_trips(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18dilated", "c1_deepsup").eval()
    for m in source.modules():  # non-trivial BN statistics, so a skipped load would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save(csail_style(source.encoder.state_dict()), tmp_path / "encoder_epoch_20.pth")
    torch.save(csail_style(source.decoder.state_dict()), tmp_path / "decoder_epoch_20.pth")
    torch.manual_seed(1)
    loaded = build_model(
        "resnet18dilated",
        "c1_deepsup",
        weights_encoder=tmp_path / "encoder_epoch_20.pth",
        weights_decoder=str(tmp_path / "decoder_epoch_20.pth"),
    ).eval()
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18dilated", "mobilenetv2dilated"])
def test_imagenet_weights_drop_only_the_classifier(arch):
    ours = encoder(arch)
    imagenet_arch = "resnet18" if arch.startswith("resnet") else arch
    extra = expand(MANIFEST["imagenet_extra"][imagenet_arch])
    assert extra, "the manifest lists the ImageNet classifier modules"
    state = {**ours.state_dict(), **{k: torch.zeros(s) for k, s in extra.items()}}
    load_weights(build_encoder(arch), state)  # strict after dropping the classifier


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys():
    state = build_decoder("c1", 150, 720).state_dict()
    state.pop("cbr.1.running_var")
    state["cbr.7.weight"] = torch.zeros(3)
    state["conv_last.weight"] = torch.zeros(151, 180, 1, 1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(build_decoder("c1", 150, 720), state, "decoder 'c1'")
    message = str(info.value)
    assert "cbr.1.running_var" in message and "cbr.7.weight" in message
    assert "conv_last.weight" in message and "151" in message


def test_missing_or_unreadable_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_encoder("resnet18", weights=tmp_path / "nope.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointMismatchError, match=r"cut\.pth: cannot read weights"):
        build_encoder("resnet18", weights=tmp_path / "cut.pth")


# ---------------------------------------------------------------------------- forward passes
# Every CSAIL pair, plus each decoder on a second encoder: (encoder, decoder, size, stride).
PAIRS = [
    ("mobilenetv2dilated", "c1_deepsup", 16, 8),
    ("resnet18dilated", "ppm_deepsup", 16, 8),
    ("resnet50dilated", "ppm_deepsup", 16, 8),
    ("resnet101dilated", "ppm_deepsup", 16, 8),
    ("resnet50", "upernet", 32, 4),
    ("resnet101", "upernet", 32, 4),
    ("resnet18", "c1", 64, 32),
    ("resnet18dilated", "c1_deepsup", 16, 8),
    ("resnet18dilated", "ppm", 16, 8),
    ("mobilenetv2dilated", "ppm", 16, 8),
    ("mobilenetv2dilated", "ppm_deepsup", 16, 8),
    ("resnet18", "upernet", 32, 4),
    ("resnet18", "upernet_lite", 32, 4),
]


def check_forward_backward(model, size, stride, batch=2, num_class=150):
    # Non-square where cheap (to catch swapped axes); square for the stride-32 encoders.
    height, width = size, size + (8 if model.size_multiple == 8 else 0)
    images = torch.randn(batch, 3, height, width)
    out = model.train()(images)
    assert isinstance(out, SegmentationOutput)
    expected = (batch, num_class, height // stride, width // stride)
    assert out.logits.shape == expected
    deep = model.deep_supervision_weight is not None
    assert (out.aux_logits is not None) == deep
    loss = out.logits.square().mean()
    if deep:
        assert out.aux_logits.shape == expected  # stage-3 features, same stride here
        loss = loss + model.deep_supervision_weight * out.aux_logits.square().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"

    model.eval()
    with torch.no_grad():
        logits = model(images)
        assert logits.shape == (batch, num_class, height, width)
        plain = model.decoder(model.encoder(images)).logits
        assert plain.shape == expected
        upsampled = F.interpolate(plain, size=(height, width), mode="bilinear", align_corners=False)
        torch.testing.assert_close(logits, upsampled)


@pytest.mark.parametrize(("enc", "dec", "size", "stride"), PAIRS)
def test_forward_backward_train_and_eval(enc, dec, size, stride):
    torch.manual_seed(0)
    model = build_model(enc, dec, num_class=150)
    assert model.deep_supervision_weight == (DEEP_SUPERVISION_WEIGHT if "deepsup" in dec else None)
    check_forward_backward(model, size, stride)


def test_hrnetv2_c1_forward_backward():
    torch.manual_seed(0)  # big: once, tiny input (its lowest branch runs at stride 32)
    check_forward_backward(build_model("hrnetv2", "c1", num_class=7), 32, 4, num_class=7)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), batch=st.integers(1, 2))
def test_output_sizes_follow_input_sizes(h, w, batch):
    model = small_model()
    images = torch.randn(batch, 3, 8 * h, 8 * w)
    with torch.no_grad():
        assert model.eval()(images).shape == (batch, 5, 8 * h, 8 * w)
        # output stride 8, with no padding or cropping anywhere in between
        assert model.decoder(model.encoder(images)).logits.shape == (batch, 5, h, w)


def test_logits_at_resizes_feature_logits_once_to_any_size():
    model = small_model().eval()
    images = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        features = model.decoder(model.encoder(images)).logits
        for size in ((45, 61), (32, 40), (7, 9)):
            expected = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
            assert torch.equal(model.logits_at(images, size), expected)
        assert torch.equal(model(images), model.logits_at(images, (32, 40)))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.logits_at(torch.randn(1, 3, 30, 40), (30, 40))


@functools.cache
def small_model():
    return build_model("resnet18dilated", "c1", num_class=5)


def test_fc_dim_defaults_to_encoder_width():
    widths = {
        "mobilenetv2dilated": 320,
        "resnet18": 512,
        "resnet50dilated": 2048,
        "resnet101": 2048,
        "hrnetv2": 720,
    }
    for arch, width in widths.items():
        assert encoder(arch).out_channels[-1] == width
    assert build_model("resnet18", "c1", fc_dim=512).decoder.cbr[0].in_channels == 512
    with pytest.raises(ValueError, match="fc_dim=2048"):
        build_model("resnet18", "c1", fc_dim=2048)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("builder", "name", "kind", "valid"),
    [
        (build_encoder, "resnet34", "encoder", "resnet101, resnet101dilated, resnet18"),
        (lambda n: build_decoder(n, 150, 512), "fcn", "decoder", "ppm, ppm_deepsup, upernet"),
        (lambda n: build_model(n, "c1"), "vgg16", "encoder", "hrnetv2, mobilenetv2dilated"),
        (lambda n: build_model("resnet18", n), "deeplab", "decoder", "c1, c1_deepsup, ppm"),
        (
            lambda n: build_model("resnet18", "c1", scope=n),
            "head",
            "scope",
            "all, decoder, encoder",
        ),
    ],
)
def test_unknown_names_list_the_valid_ones(builder, name, kind, valid):
    with pytest.raises(ValueError, match=rf"unknown {kind} architecture '{name}'") as info:
        builder(name)
    assert valid in str(info.value)


def test_deep_supervision_needs_two_feature_maps():
    with pytest.raises(ValueError, match="at least two feature maps"):
        build_model("hrnetv2", "c1_deepsup")


@pytest.mark.parametrize(
    ("images", "error", "pattern"),
    [
        (torch.randn(3, 16, 16), ValueError, r"\(N, 3, H, W\)"),
        (torch.randn(1, 4, 16, 16), ValueError, r"\(N, 3, H, W\)"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.randn(1, 3, 20, 16), ValueError, "20x16 is not a multiple of 8.*does not pad"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_get_clear_errors(images, error, pattern):
    with pytest.raises(error, match=pattern):
        small_model()(images)


# --------------------------------------------------------------- tracing, sync BN, round trip
@pytest.mark.parametrize("arch", ["resnet18dilated", "resnet50", "mobilenetv2dilated"])
def test_model_is_fx_traceable(arch):
    model = build_model(arch, "ppm_deepsup" if "dilated" in arch else "upernet_lite").eval()
    traced = torch.fx.symbolic_trace(model)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(images), model(images), rtol=0, atol=0)


def test_hrnet_is_fx_traceable():
    hrnet = encoder("hrnetv2").eval()
    graph = torch.fx.symbolic_trace(hrnet).graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert "stage4.2.fuse_layers.0.3.0" in calls  # module calls inlined down to the leaves


class ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward, children as leaves (how BN→act fusion sees a block)."""

    def is_leaf_module(self, module, qualified_name):
        return True


@pytest.mark.parametrize("enc", sorted(ENCODERS))
def test_every_block_traces_on_its_own(enc):
    """Each of our modules traces alone, the same in train and eval mode; only the model (eval
    upsamples) and deep-supervised decoders (aux head in training only) depend on the mode."""
    modules = {"encoder": encoder(enc)}
    width = encoder(enc).out_channels
    for dec in DECODERS:
        if len(width) > 1 or dec in ("c1", "ppm"):
            modules[dec] = build_decoder(dec, 3, width[-1], in_channels=width)
    for owner, root in modules.items():
        for name, module in root.named_modules():
            if not type(module).__module__.startswith("segmentation."):
                continue
            codes = set()
            for training in (True, False):
                module.train(training)
                codes.add(ShallowTracer().trace(module).python_code("self").src)
            mode_dependent = getattr(module, "deep_supervision", False)
            assert len(codes) == (2 if mode_dependent else 1), f"{owner}: {name or '<root>'}"


def test_sync_bn_replaces_every_batchnorm_and_keeps_keys():
    plain = build_model("resnet18dilated", "ppm_deepsup")
    synced = build_model("resnet18dilated", "ppm_deepsup", sync_bn=True)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert shapes(synced) == shapes(plain)


# ---------------------------------------------- activations through mishkit.convert (contract)
def mishkit_module():
    try:
        import mishkit
    except ImportError as error:
        raise AssertionError("mishkit (with mishkit.convert) is not importable yet") from error
    return mishkit


def activation_paths(module: nn.Module, prefix: str) -> dict[str, type]:
    return {
        f"{prefix}.{name}": type(m)
        for name, m in module.named_modules()
        if isinstance(m, (nn.ReLU, nn.ReLU6)) or type(m).__module__.startswith("mishkit")
    }


def test_mish_keeps_the_parameter_set():
    mishkit_module()
    relu = build_model("mobilenetv2dilated", "c1_deepsup")
    mish = build_model("mobilenetv2dilated", "c1_deepsup", activation="mish")
    assert shapes(mish) == shapes(relu)
    assert not [m for m in mish.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    check_forward_backward(mish, 16, 8)


def test_decoder_scope_converts_only_the_decoder():
    mishkit = mishkit_module()
    model = build_model("resnet18dilated", "ppm_deepsup", activation="mish", scope="decoder")
    assert all(type(m) is nn.ReLU for m in model.encoder.modules() if isinstance(m, nn.ReLU))
    assert not [m for m in model.decoder.modules() if isinstance(m, nn.ReLU)]
    assert any(isinstance(m, mishkit.nn.Mish) for m in model.decoder.modules())
    replaced = {path for path, *_ in model.conversion_report.replaced}
    plain = build_model("resnet18dilated", "ppm_deepsup")
    decoder_relus = {
        f"decoder.{n}" for n, m in plain.decoder.named_modules() if isinstance(m, nn.ReLU)
    }
    assert replaced == decoder_relus, model.conversion_report


def test_fuse_bn_keeps_keys_and_function():
    mishkit = mishkit_module()
    torch.manual_seed(0)
    plain = build_model("resnet18dilated", "ppm_deepsup").eval()
    fused = build_model(
        "resnet18dilated",
        "ppm_deepsup",
        fuse_bn=True,
        weights_encoder=plain.encoder.state_dict(),
        weights_decoder=plain.decoder.state_dict(),
    ).eval()
    assert shapes(fused) == shapes(plain)
    # BN→ReLU inside residual blocks fuses too (the blocks are fx-traceable).
    assert isinstance(fused.encoder.layer1[0].bn1, mishkit.nn.BatchNormAct2d)
    assert isinstance(fused.decoder.conv_last[1], mishkit.nn.BatchNormAct2d)
    assert not [n for n, m in fused.decoder.named_modules() if type(m) is nn.BatchNorm2d]
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(images), plain(images))


def test_sync_bn_then_fuse_gives_sync_batchnorm_act():
    mishkit = mishkit_module()
    model = build_model(
        "resnet18dilated", "c1_deepsup", activation="mish", fuse_bn=True, sync_bn=True
    )
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert any(isinstance(m, mishkit.nn.SyncBatchNormAct2d) for m in norms)
    assert all(isinstance(m, (nn.SyncBatchNorm, mishkit.nn.SyncBatchNormAct2d)) for m in norms)
