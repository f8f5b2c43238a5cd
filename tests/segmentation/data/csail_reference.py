"""Regenerate csail_modules.json from CSAIL's reference code, and check our models against it.

Not part of the test suite (it needs the reference package, which the project does not depend on):

    pip download mit-semseg==1.0.0 --no-deps -d /tmp/ref
    python -m zipfile -e /tmp/ref/mit_semseg-1.0.0-py3-none-any.whl /tmp/ref/src
    python tests/segmentation/data/csail_reference.py /tmp/ref/src manifest   # rewrite the JSON
    python tests/segmentation/data/csail_reference.py /tmp/ref/src compare    # softmax equality
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
FC_DIM = {"mobilenetv2dilated": 320, "hrnetv2": 720}
DECODER_ENTRIES = [
    ("c1", 720), ("c1", 512), ("c1_deepsup", 320), ("c1_deepsup", 512), ("ppm", 2048),
    ("ppm", 320), ("ppm_deepsup", 512), ("ppm_deepsup", 2048), ("upernet", 2048),
    ("upernet", 512), ("upernet_lite", 512),
]  # fmt: skip


def fc_dim(encoder: str) -> int:
    return FC_DIM.get(encoder, 512 if encoder.startswith("resnet18") else 2048)


def describe(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        o, i, kh, kw = m.weight.shape
        text = f"conv {o}x{i}x{kh}x{kw}" + (" bias" if m.bias is not None else "")
        text += f" stride{m.stride[0]}" if m.stride != (1, 1) else ""
        text += f" dilation{m.dilation[0]}" if m.dilation != (1, 1) else ""
        expected = (kh // 2 * m.dilation[0], kw // 2 * m.dilation[1])
        text += f" padding{m.padding[0]}" if m.padding != expected else ""
        return text + (f" groups{m.groups}" if m.groups != 1 else "")
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"bn {m.num_features}"
    if isinstance(m, nn.Linear):
        return f"linear {m.out_features}x{m.in_features}"
    assert not list(m.parameters(recurse=False)), f"undescribed parameters in {type(m)}"
    return None


def modules_of(model: nn.Module) -> dict[str, str]:
    return {name: text for name, m in model.named_modules() if (text := describe(m))}


def reference(src: str):
    sys.path.insert(0, src)
    from mit_semseg.models import hrnet, mobilenet, models, resnet

    def encoder(arch: str) -> nn.Module:
        if arch == "hrnetv2":
            return hrnet.hrnetv2(pretrained=False)
        if arch == "mobilenetv2dilated":
            return models.MobileNetV2Dilated(mobilenet.mobilenetv2(pretrained=False), 8)
        net = getattr(resnet, arch.removesuffix("dilated"))(pretrained=False)
        return models.ResnetDilated(net, 8) if arch.endswith("dilated") else models.Resnet(net)

    def decoder(arch: str, fc: int, use_softmax: bool = False) -> nn.Module:
        if arch.startswith("upernet"):
            inplanes = (64, 128, 256, 512) if fc == 512 else (256, 512, 1024, 2048)
            width = 512 if arch == "upernet" else 256
            return models.UPerNet(150, fc, use_softmax, fpn_inplanes=inplanes, fpn_dim=width)
        classes = {"c1": models.C1, "c1_deepsup": models.C1DeepSup, "ppm": models.PPM,
                   "ppm_deepsup": models.PPMDeepsup}  # fmt: skip
        return classes[arch](150, fc, use_softmax)

    imagenet = {"mobilenetv2dilated": mobilenet.mobilenetv2, "resnet18": resnet.resnet18,
                "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}  # fmt: skip
    return encoder, decoder, imagenet


def write_manifest(src: str) -> None:
    from segmentation.models import ENCODERS

    encoder, decoder, imagenet = reference(src)
    encoders = {arch: modules_of(encoder(arch)) for arch in sorted(ENCODERS)}
    extra = {}
    for arch, make in imagenet.items():
        extra[arch] = {k: v for k, v in modules_of(make(pretrained=False)).items()
                       if k not in encoders[arch]}  # fmt: skip
    decoders = {f"{a}/fc_dim={fc}": modules_of(decoder(a, fc)) for a, fc in DECODER_ENTRIES}
    manifest = json.loads((HERE / "csail_modules.json").read_text())
    manifest.update(encoders=encoders, imagenet_extra=extra, decoders=decoders)
    (HERE / "csail_modules.json").write_text(json.dumps(manifest, indent=0) + "\n")


def compare(src: str) -> None:
    """Same random weights in both → eval softmax and training log-softmax must agree."""
    from segmentation.models import CSAIL_CONFIGS, build_model

    encoder, decoder, _ = reference(src)
    torch.manual_seed(0)
    for enc_arch, dec_arch in CSAIL_CONFIGS.values():
        ref_enc, ref_dec = encoder(enc_arch), decoder(dec_arch, fc_dim(enc_arch), True)
        for m in [*ref_enc.modules(), *ref_dec.modules()]:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
        ours = build_model(enc_arch, dec_arch, weights_encoder=ref_enc.state_dict(),
                           weights_decoder=ref_dec.state_dict()).eval()  # fmt: skip
        images = torch.randn(2, 3, 64, 96)
        with torch.no_grad():
            expected = ref_dec.eval()(ref_enc.eval()(images, True), segSize=(64, 96))
            error = (ours(images).softmax(1) - expected).abs().max().item()
        print(f"{enc_arch}-{dec_arch}: max |softmax difference| = {error:.2e}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    {"manifest": write_manifest, "compare": compare}[sys.argv[2]](sys.argv[1])
