"""mishkit.convert on real Hugging Face transformers models (tiny configs, random weights).

Each family is built twice from the same tiny config: once with its own activation, once
configured for Mish (the config's activation field; activations the model hard-codes swapped for
torch's nn.Mish by hand, and Whisper's hard-coded ``nn.functional.gelu`` patched to ``F.mish``).
The converted model must match the Mish-configured one in outputs and gradients (float64), keep
every state_dict key, and account for every activation site. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mishkit
import mishkit.nn as mnn
from mishkit.conversion import identify

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download
import transformers  # a test dependency (scripts/setup_env.sh, pyproject's [test])
from transformers import activations as hf_activations

T = transformers
TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=32)
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
              image_size=16, patch_size=8)
TORCH_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU,
                     nn.Hardswish)
# transformers' own list of activations (ACT2CLS), minus what squashes or passes through
HF_GATES = {nn.Sigmoid, nn.Tanh, hf_activations.LinearActivation,
            hf_activations.LaplaceActivation, hf_activations.SqrtSoftplusActivation}
HF_CLASSES = {value[0] if isinstance(value, tuple) else value
              for value in hf_activations.ACT2CLS.values()}
SITE_CLASSES = (HF_CLASSES - HF_GATES) | set(TORCH_ACTIVATIONS)


@dataclass
class Family:
    build: object  # activation name -> model
    act: str  # the family's own activation, as its config spells it
    inputs: str  # "text" | "image16" | "image32" | "whisper"
    cnn: bool = False  # BN + activation pairs: fuse_bn, run with batch statistics (train mode)
    fused: dict = field(default_factory=dict)  # expected report counts with fuse_bn
    skipped: tuple = ()  # paths the report must list as skipped (with fuse_bn)
    fuse_bn: bool | None = None  # default: cnn


FAMILIES = {
    "bert": Family(lambda a: T.BertModel(T.BertConfig(**TEXT, hidden_act=a)), "gelu", "text"),
    "distilbert": Family(lambda a: T.DistilBertModel(T.DistilBertConfig(
        vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=24, max_position_embeddings=32,
        activation=a)), "gelu", "text"),
    "gpt2": Family(lambda a: T.GPT2Model(T.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0, activation_function=a)), "gelu_new", "text"),
    "llama": Family(lambda a: T.LlamaModel(T.LlamaConfig(**TEXT, num_key_value_heads=1,
                                                         hidden_act=a)), "silu", "text"),
    "qwen2": Family(lambda a: T.Qwen2Model(T.Qwen2Config(**TEXT, num_key_value_heads=1,
                                                         hidden_act=a)), "silu", "text"),
    "gemma": Family(lambda a: T.GemmaModel(T.GemmaConfig(
        **TEXT, num_key_value_heads=1, head_dim=8, hidden_act=a)), "gelu_pytorch_tanh",
        "text"),
    "phi": Family(lambda a: T.PhiModel(T.PhiConfig(**TEXT, hidden_act=a)), "gelu_new", "text"),
    "gpt_neox": Family(lambda a: T.GPTNeoXModel(T.GPTNeoXConfig(**TEXT, hidden_act=a)), "gelu",
                       "text"),
    "t5": Family(lambda a: T.T5EncoderModel(T.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
        feed_forward_proj=f"gated-{a}")), "gelu", "text"),  # "gated-gelu" is gelu_new
    "clip": Family(lambda a: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION, hidden_act=a)),
                   "quick_gelu", "image16"),
    "vit": Family(lambda a: T.ViTModel(T.ViTConfig(**VISION, hidden_act=a)), "gelu", "image16"),
    "swin": Family(lambda a: T.SwinModel(T.SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
        window_size=2, hidden_act=a)), "gelu", "image16"),
    "convnext": Family(lambda a: T.ConvNextModel(T.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], hidden_act=a)), "gelu", "image32"),
    "mobilevit": Family(lambda a: T.MobileViTModel(T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
        num_attention_heads=2, hidden_dropout_prob=0.0, hidden_act=a)), "silu", "image32",
        cnn=True, fused={"fused_bn": 25}),  # every conv layer with an activation
    # its decode head's forward iterates over a tuple argument: fx cannot see what follows the BN
    "segformer": Family(lambda a: T.SegformerForSemanticSegmentation(T.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 2], decoder_hidden_size=16, patch_sizes=[7, 3], strides=[4, 2],
        mlp_ratios=[2, 2], hidden_act=a)), "gelu", "image32",
        fuse_bn=True, skipped=("decode_head.batch_norm",)),
    "whisper": Family(lambda a: T.WhisperModel(T.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        num_mel_bins=8, max_source_positions=8, max_target_positions=16,
        activation_function=a)), "gelu", "whisper"),
    # tf_padding: padding computed with int(x.shape[-1]) in a helper fx must keep as one call
    "mobilenetv2": Family(lambda a: T.MobileNetV2Model(T.MobileNetV2Config(
        depth_multiplier=0.25, image_size=32, tf_padding=True, finegrained_output=False,
        hidden_act=a)), "relu6", "image32", cnn=True, fused={"fused_bn": 35}),
    # bottlenecks end in act(layer[-1].normalization(...) + shortcut): fused across modules
    "resnet": Family(lambda a: T.ResNetModel(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck",
        hidden_act=a)), "relu", "image32", cnn=True, fused={"fused_bn": 5, "fused_bn_add": 2}),
    "regnet": Family(lambda a: T.RegNetModel(T.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, hidden_act=a)),
        "relu", "image32", cnn=True, fused={"fused_bn": 5, "fused_bn_add": 2}),
}


def build(family: Family, act: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config notes about token ids of the tiny vocabulary
        model = family.build(act)
    return model.double().train(family.cnn)


def redraw(model: nn.Module, seed: int = 1) -> None:
    """Weights at a scale where deep outputs neither vanish nor explode (HF's default init makes
    a random CNN's features vanish): fan-in scaled weights, norm scales near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(normal(p.shape, 1 / math.sqrt(p[0].numel())))
            else:
                p.copy_(normal(p.shape, 0.2, 1.0) if name.endswith("weight")
                        else normal(p.shape, 0.1))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(normal(b.shape, 0.1))
            elif name.endswith("running_var"):
                b.copy_(normal(b.shape, 0.1, 1.0).abs())


def mish_reference(family: Family, name: str, weights: dict) -> nn.Module:
    """The family configured for Mish; activations it hard-codes swapped for nn.Mish by hand."""
    model = build(family, "mish")
    for path, module in list(model.named_modules()):
        if type(module) in TORCH_ACTIVATIONS and type(module) is not nn.Mish:
            model.set_submodule(path, nn.Mish())
    model.load_state_dict(weights)
    return model


def make_inputs(kind: str) -> dict:
    gen = torch.Generator().manual_seed(2)
    if kind == "text":
        return {"input_ids": torch.randint(3, 64, (2, 6), generator=gen)}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 16, generator=gen, dtype=torch.float64),
                "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=gen)}
    size = int(kind.removeprefix("image"))
    return {"pixel_values": torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)}


def run(model, inputs, whisper_gelu_is_mish=False):
    """(output, {name: grad}, input grad) of one forward + backward with a fixed output grad."""
    model.zero_grad()
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    patch = (mock.patch.object(torch.nn.functional, "gelu", F.mish) if whisper_gelu_is_mish
             else contextlib.nullcontext())
    with patch:
        out = model(**inputs)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                         dtype=out.dtype)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    images = [v.grad for v in inputs.values() if v.grad is not None]
    return out.detach(), grads, images


def activation_sites(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if type(m) in SITE_CLASSES]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_converted_family_matches_the_family_configured_for_mish(name):
    family = FAMILIES[name]
    model = build(family, family.act)
    redraw(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sites = activation_sites(model)
    assert sites, f"{name}: the tiny config has no activation site"
    reference = mish_reference(family, name, weights)

    fuse_bn = family.cnn if family.fuse_bn is None else family.fuse_bn
    model, report = mishkit.convert(model, "mish", functional=True, fuse_bn=fuse_bn,
                                    report=True)
    accounted = {p for p, *_ in report.replaced} | {p for p, _ in report.skipped}
    assert set(sites) <= accounted, report
    assert [p for p, _ in report.skipped] == list(family.skipped), report
    for kind, count in family.fused.items():
        assert report.counts[kind] == count, report
    assert list(model.state_dict()) == list(weights)
    if name == "whisper":  # the encoder's own nn.functional.gelu calls, routed at run time
        assert [p for p, *_, kind in report.replaced if kind == "runtime"] == ["encoder"]

    inputs = make_inputs(family.inputs)
    out, grads, images = run(model, inputs)
    ref_out, ref_grads, ref_images = run(reference, inputs, whisper_gelu_is_mish=name == "whisper")
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], msg=key)
    for grad, ref_grad in zip(images, ref_images, strict=True):
        torch.testing.assert_close(grad, ref_grad)
    if family.cnn:  # BN running statistics updated the same way by the fused modules
        for (key, value), ref_value in zip(model.state_dict().items(),
                                           reference.state_dict().values()):
            torch.testing.assert_close(value, ref_value, msg=key)


def test_every_hf_activation_class_is_mapped_and_computes_its_registry_formula():
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    for key, value in hf_activations.ACT2CLS.items():
        cls, kwargs = value if isinstance(value, tuple) else (value, {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # xIELU: "CUDA-fused xIELU not available"
            module = cls(**kwargs).double()
        site = identify(module)
        assert site is not None and site.kind != "unknown", key
        assert (site.kind == "gate") == (cls in HF_GATES), key
        if site.known is not None and site.known.activation is not None:
            spec = mishkit.ACTIVATIONS[site.known.activation]
            # transformers' own forward against mishkit's float64 formula
            torch.testing.assert_close(module(x), spec.reference(x, **spec.params), rtol=1e-9,
                                       atol=1e-12,
                                       msg=key)


def test_hf_composite_and_parameterised_activations_are_units():
    model = nn.Sequential(nn.Linear(4, 4), hf_activations.ReLUSquaredActivation(),
                          hf_activations.ClippedGELUActivation(-1.0, 1.0),
                          hf_activations.QuickGELUActivation()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.append(hf_activations.XIELUActivation(dtype=torch.float64))
    model, report = mishkit.convert(model, "mish", functional=True, report=True)
    assert [type(m) for m in model[1:4]] == [mnn.Mish] * 3  # replaced whole, never inside
    assert type(model[4]) is hf_activations.XIELUActivation
    assert report.skipped == [("4", "transformers.activations.XIELUActivation: it has learned "
                                    "parameters that the replacement would drop")]
    assert report.counts["functional"] == 0


def test_runtime_route_on_whisper_encoder_is_removed_by_native():
    family = FAMILIES["whisper"]
    model = build(family, "gelu")
    original = build(family, "gelu")
    mishkit.convert(model, "mish", functional=True)
    assert isinstance(model.encoder.forward, mishkit.conversion.runtime.RuntimeForward)
    model, report = mishkit.convert(model, "native", report=True)
    assert "forward" not in model.encoder.__dict__
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())
    assert ("encoder", "mishkit.functional.activation('mish') at run time", "torch functions",
            "runtime") in report.replaced
    # back to torch: the encoder's F.gelu is gelu again, the layers' activations torch's Mish
    inputs = make_inputs("whisper")
    expected = mish_reference(family, "whisper", original.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs)[0], expected(**inputs)[0])


@pytest.mark.parametrize("name", ["llama", "resnet"])
def test_converted_family_compiles_fullgraph(name):
    family = FAMILIES[name]
    model = build(family, family.act).eval()
    redraw(model)
    mishkit.convert(model, "mish", functional=True, fuse_bn=family.cnn)
    inputs = make_inputs(family.inputs)
    with torch.no_grad():
        expected = model(**inputs)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(**inputs)[0], expected)
