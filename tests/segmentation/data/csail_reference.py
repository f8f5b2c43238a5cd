"""Regenerate csail_modules.json from CSAIL's reference code, and check our code against it.

Not part of the test suite (it needs the reference package, which the project does not depend on):

    pip download mit-semseg==1.0.0 --no-deps -d /tmp/ref
    python -m zipfile -e /tmp/ref/mit_semseg-1.0.0-py3-none-any.whl /tmp/ref/src
    python tests/segmentation/data/csail_reference.py /tmp/ref/src manifest   # rewrite the JSON
    python tests/segmentation/data/csail_reference.py /tmp/ref/src compare    # probabilities
    python tests/segmentation/data/csail_reference.py /tmp/ref/src data       # train/val samples
    python tests/segmentation/data/csail_reference.py /tmp/ref/src eval       # eval + infer CLIs

``data`` and ``eval`` run CSAIL's own dataset classes (torchvision, which cannot be installed
beside this project's torch, is stood in for by its one used piece, ``transforms.Normalize``)
on images of real ADE20K sizes from the shipped index files. ``eval`` saves a CSAIL model's
weights as CSAIL's training saves them (encoder_epoch_N.pth / decoder_epoch_N.pth, SyncBN
buffers included), scores them with CSAIL's evaluation steps (its SegmentationModule, ``accuracy``
and ``intersectionAndUnion``; the loop of its eval.py / test.py, which the wheel does not ship,
restated) and with our ``segmentation.eval`` / ``segmentation.infer`` command lines.
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
            # A label size that is not the input's: CSAIL's segSize, our logits_at.
            expected = ref_dec(ref_enc(images, True), segSize=(53, 101))
            other = (ours.logits_at(images, (53, 101)).softmax(1) - expected).abs().max().item()
        print(f"{enc_arch}-{dec_arch}: max |softmax difference| = {error:.2e} at the input "
              f"size, {other:.2e} at 53x101")


def _csail_data_modules(src: str):
    """CSAIL's dataset module and utils, with torchvision's Normalize stood in for."""
    import types

    class Normalize:  # torchvision.transforms.Normalize on a float tensor, as CSAIL calls it
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub_(mean).div_(std)

    fake = types.ModuleType("torchvision")
    fake.transforms = types.SimpleNamespace(Normalize=Normalize)
    sys.modules.setdefault("torchvision", fake)
    sys.path.insert(0, src)
    from mit_semseg import dataset, utils

    return dataset, utils


def _write_images(root: Path, records, seed: int, scenes: bool = False) -> Path:
    """Random images and labels (0..150) at the records' sizes, or synthetic scenes (whose
    regions a random network tells apart); an odgt listing them."""
    import numpy as np
    from PIL import Image

    from segmentation.data.synthetic import generate_scene

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        if scenes:
            image, label = generate_scene(rng, rec.height, rec.width)
        else:
            image = rng.integers(0, 256, (rec.height, rec.width, 3), dtype=np.uint8)
            label = rng.integers(0, 151, (rec.height, rec.width), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "annotations" / f"im{i}.png")
        lines.append(json.dumps({"fpath_img": f"images/im{i}.png",
                                 "fpath_segm": f"annotations/im{i}.png",
                                 "width": rec.width, "height": rec.height}))
    (root / "list.odgt").write_text("\n".join(lines) + "\n")
    return root / "list.odgt"


def _sizes_that_differ(split: str, count: int, sizes=(300, 375, 450, 525, 600)):
    """Index records whose truncated and rounded scaled sizes differ (the cases that matter)."""
    from segmentation.data import official_odgt, read_odgt

    chosen = []
    for rec in read_odgt(official_odgt(split)):
        for side in sizes:
            scale = min(side / min(rec.height, rec.width), 1000 / max(rec.height, rec.width))
            if int(rec.height * scale) != round(rec.height * scale) or \
                    int(rec.width * scale) != round(rec.width * scale):
                chosen.append(rec)
                break
        if len(chosen) == count:
            return chosen
    return chosen


def compare_data(src: str) -> None:
    """CSAIL's TrainDataset / ValDataset samples vs ours, on real ADE20K training sizes."""
    import tempfile
    import types

    import numpy as np

    from segmentation.data import SampleSpec, TrainDataset, ValDataset

    dataset, _ = _csail_data_modules(src)
    with tempfile.TemporaryDirectory() as tmp:
        odgt = _write_images(Path(tmp), _sizes_that_differ("training", 6), seed=0)
        for rate, padding in ((1, 8), (8, 8), (4, 32)):
            ours = TrainDataset(odgt, tmp, padding_constant=padding, segm_downsampling_rate=rate)
            worst_img, bad_labels = 0.0, 0
            for index, rec in enumerate(ours.records):
                for side in (300, 375, 450, 525, 600):
                    opt = types.SimpleNamespace(imgSizes=(side,), imgMaxSize=1000,
                                                padding_constant=padding,
                                                segm_downsampling_rate=rate)
                    ref = dataset.TrainDataset(tmp, str(odgt), opt, batch_per_gpu=1)
                    ref.list_sample = [ref.list_sample[index]]
                    ref.num_sample, ref.if_shuffled = 1, True
                    np.random.seed(side)
                    np.random.choice((side,))
                    flip = bool(np.random.choice([0, 1]))
                    np.random.seed(side)
                    expected = ref[0]
                    got = ours.collate_fn([ours[SampleSpec(index, side, flip)]])
                    if got["img"].shape != expected["img_data"].shape:
                        raise AssertionError(f"{rec.name} at {side}: image "
                                             f"{tuple(got['img'].shape)} vs CSAIL "
                                             f"{tuple(expected['img_data'].shape)}")
                    worst_img = max(worst_img, (got["img"] - expected["img_data"]).abs().max())
                    labelled = got["segm"] != -1  # CSAIL pads the batch with 0 ("wall")
                    bad_labels += int((got["segm"] != expected["seg_label"])[labelled].sum())
            print(f"train samples, label rate {rate}, padding {padding}: max |image diff| "
                  f"{float(worst_img):.1e}, differing labels {bad_labels}")
        opt = types.SimpleNamespace(imgSizes=(300, 375, 450, 525, 600), imgMaxSize=1000,
                                    padding_constant=8)
        val_odgt = _write_images(Path(tmp) / "val", _sizes_that_differ("validation", 6), seed=1)
        ref = dataset.ValDataset(str(Path(tmp) / "val"), str(val_odgt), opt)
        ours = ValDataset(val_odgt, Path(tmp) / "val", img_sizes=opt.imgSizes)
        worst = 0.0
        for index in range(len(ours)):
            expected, got = ref[index], ours[index]
            for a, b in zip(got["imgs"], expected["img_data"], strict=True):
                if a.unsqueeze(0).shape != b.shape:
                    raise AssertionError(f"val input {tuple(a.shape)} vs CSAIL {tuple(b.shape)}")
                worst = max(worst, float((a.unsqueeze(0) - b).abs().max()))
            assert torch.equal(got["segm"], expected["seg_label"][0])
        print(f"val samples: every input size equal, max |image diff| {worst:.1e}, labels equal")


def compare_eval(src: str) -> None:
    """CSAIL's evaluation and test steps vs our eval and infer CLIs, single- and multi-scale."""
    import tempfile

    import numpy as np
    from PIL import Image

    from segmentation.eval import main as eval_main
    from segmentation.infer import main as infer_main

    dataset, utils = _csail_data_modules(src)
    from mit_semseg.models import ModelBuilder, SegmentationModule

    encoder, decoder, _ = reference(src)
    torch.manual_seed(0)
    enc_arch, dec_arch = "mobilenetv2dilated", "c1_deepsup"
    ref_enc, ref_dec = encoder(enc_arch), decoder(dec_arch, fc_dim(enc_arch))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        odgt = _write_images(tmp, _sizes_that_differ("validation", 2), seed=2, scenes=True)
        # BN statistics of these images (a random network's are far off, and its prediction
        # constant); no dominant class bias, so that the arg-max varies over the image.
        calibration = dataset.ValDataset(str(tmp), str(odgt), types_namespace(
            imgSizes=(300, 450), imgMaxSize=1000, padding_constant=8))
        norms = [m for m in [*ref_enc.modules(), *ref_dec.modules()]
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        views = [img for k in range(len(calibration)) for img in calibration[k]["img_data"]]
        with torch.no_grad():
            ref_dec.conv_last.bias.zero_()
            for n, img in enumerate(views):
                for m in norms:
                    m.momentum = 1 / (n + 1)  # the running averages become plain means
                ref_dec.train()(ref_enc.train()(img, return_feature_maps=True))
        for m in norms:
            m.momentum = 0.1
        torch.save(ref_enc.state_dict(), tmp / "encoder_epoch_20.pth")  # CSAIL's checkpoint()
        torch.save(ref_dec.state_dict(), tmp / "decoder_epoch_20.pth")
        net_enc = ModelBuilder.build_encoder(enc_arch, fc_dim(enc_arch),
                                             str(tmp / "encoder_epoch_20.pth"))
        net_dec = ModelBuilder.build_decoder(dec_arch, fc_dim(enc_arch), 150,
                                             str(tmp / "decoder_epoch_20.pth"), use_softmax=True)
        module = SegmentationModule(net_enc, net_dec, nn.NLLLoss(ignore_index=-1)).eval()
        # Labels = CSAIL's own single-scale predictions (a corner unlabelled), so that a single
        # pixel predicted differently shows in the accuracy, as in a real evaluation.
        test = dataset.TestDataset([{"fpath_img": str(tmp / "images" / f"im{k}.png")}
                                    for k in range(2)], types_namespace(
            imgSizes=(450,), imgMaxSize=1000, padding_constant=8))
        with torch.no_grad():
            for k in range(len(test)):
                batch = test[k]
                size = batch["img_ori"].shape[:2]
                pred = module({"img_data": batch["img_data"][0]}, segSize=size).argmax(1)[0]
                label = (pred + 1).numpy().astype(np.uint8)
                label[:16, :16] = 0
                Image.fromarray(label).save(tmp / "annotations" / f"im{k}.png")
        (tmp / "cfg.yaml").write_text("TRAIN: {device: cpu}\n")
        common = ["MODEL.arch_encoder", enc_arch, "MODEL.arch_decoder", dec_arch,
                  "MODEL.weights_encoder", str(tmp / "encoder_epoch_20.pth"),
                  "MODEL.weights_decoder", str(tmp / "decoder_epoch_20.pth"),
                  "DATASET.root_dataset", str(tmp), "DATASET.list_val", str(odgt)]
        for name, sizes in (("single-scale", (450,)), ("multi-scale", (300, 375, 450, 525, 600))):
            opt = types_namespace(imgSizes=sizes, imgMaxSize=1000, padding_constant=8)
            val = dataset.ValDataset(str(tmp), str(odgt), opt)
            acc, inter, union, preds = [], 0, 0, []
            with torch.no_grad():
                for index in range(len(val)):
                    batch = val[index]
                    label = batch["seg_label"][0].numpy()
                    scores = torch.zeros(1, 150, *label.shape)
                    for img in batch["img_data"]:
                        probs = module({"img_data": img}, segSize=label.shape)
                        scores = scores + probs / len(sizes)
                    pred = torch.max(scores, dim=1)[1].squeeze(0).numpy()
                    preds.append(pred)
                    a, pix = utils.accuracy(pred, label)
                    i, u = utils.intersectionAndUnion(pred, label, 150)
                    acc.append((a, pix))
                    inter, union = inter + i, union + u
            csail_acc = sum(a * p for a, p in acc) / sum(p for _, p in acc)
            csail_miou = float((inter / (union + 1e-10)).mean())
            mode = ["VAL.mode", "multi", "VAL.imgSizes", str(list(sizes))] if len(sizes) > 1 \
                else ["VAL.mode", "single", "VAL.single_size", str(sizes[0])]
            eval_main(["--cfg", str(tmp / "cfg.yaml"), "--out", str(tmp / name), *common, *mode])
            ours = json.loads((tmp / name / "metrics.json").read_text())
            records = [json.loads(line) for line in (tmp / name / "per_image.jsonl").open()]
            correct = [r["correct_pixels"] for r in records]
            expected = [int(np.sum((p == lab) & (lab >= 0))) for p, lab in
                        zip(preds, (val[k]["seg_label"][0].numpy() for k in range(len(val))))]
            infer_main(["--cfg", str(tmp / "cfg.yaml"), "--imgs", str(tmp / "images"), "--out",
                        str(tmp / f"{name}-infer"), *common, *mode])
            test = dataset.TestDataset([{"fpath_img": str(tmp / "images" / f"im{k}.png")}
                                        for k in range(len(val))], opt)
            infer_equal = True
            with torch.no_grad():
                for k in range(len(test)):
                    batch = test[k]
                    size = batch["img_ori"].shape[:2]
                    scores = torch.zeros(1, 150, *size)
                    for img in batch["img_data"]:
                        scores = scores + module({"img_data": img}, segSize=size) / len(sizes)
                    pred = torch.max(scores, dim=1)[1].squeeze(0).numpy()
                    written = np.asarray(Image.open(tmp / f"{name}-infer" / f"im{k}.png"))
                    infer_equal &= bool(np.array_equal(written.astype(np.int64) - 1, pred))
            classes = len(np.unique(np.concatenate([p.ravel() for p in preds])))
            print(f"{name} ({classes} classes predicted): CSAIL Mean IoU {csail_miou:.6f}, "
                  f"Accuracy {100 * csail_acc:.4f}%; "
                  f"ours {ours['miou']:.6f}, {100 * ours['pixel_acc']:.4f}% "
                  f"(|diff| {abs(ours['miou'] - csail_miou):.1e}, "
                  f"{abs(ours['pixel_acc'] - csail_acc):.1e}); per-image correct pixels equal: "
                  f"{correct == expected}; infer labels equal to CSAIL's test: {infer_equal}")


def types_namespace(**kwargs):
    import types

    return types.SimpleNamespace(**kwargs)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    modes = {"manifest": write_manifest, "compare": compare, "data": compare_data,
             "eval": compare_eval}
    modes[sys.argv[2]](sys.argv[1])
