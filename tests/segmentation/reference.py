"""CSAIL's data and evaluation steps, restated as independent references for the tests.

What CSAILVision/semantic-segmentation-pytorch (mit_semseg 1.0.0: ``dataset.py``, ``utils.py``;
``eval.py`` and ``test.py`` of its repository) does, written out step by step with Pillow and
numpy rather than through any of our transforms. ``data/csail_reference.py`` runs CSAIL's own
code against our pipeline; these functions let the suite check the same things without it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def csail_scale(height: int, width: int, short_side: int, max_size: int) -> float:
    return min(short_side / float(min(height, width)), max_size / float(max(height, width)))


def csail_train_size(height: int, width: int, short_side: int, max_size: int):
    """(height, width) after CSAIL's training resize: float products stored into np.int32."""
    scale = csail_scale(height, width, short_side, max_size)
    sizes = np.zeros(2, np.int32)
    sizes[:] = height * scale, width * scale
    return int(sizes[0]), int(sizes[1])


def csail_val_size(height: int, width: int, short_side: int, max_size: int, multiple: int):
    """Network input (height, width) of CSAIL's validation: int() then up to a multiple."""
    scale = csail_scale(height, width, short_side, max_size)
    h, w = int(height * scale), int(width * scale)
    return ((h - 1) // multiple + 1) * multiple, ((w - 1) // multiple + 1) * multiple


def csail_image_tensor(image: Image.Image) -> torch.Tensor:
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def csail_train_sample(image: Image.Image, label: Image.Image, short_side: int, max_size: int,
                       rate: int, flip: bool):
    """One training sample as CSAIL's TrainDataset builds it, before batch padding: the
    normalized image (3, h, w) and the label (ceil(h/rate), ceil(w/rate)) shifted to -1..149.

    Flip first; Pillow BILINEAR / NEAREST resize to the truncated size; the label pasted on a
    0-filled canvas of a multiple of ``rate`` and NEAREST-downsampled by ``rate``.
    """
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        label = label.transpose(Image.FLIP_LEFT_RIGHT)
    h, w = csail_train_size(image.height, image.width, short_side, max_size)
    image = image.resize((w, h), Image.BILINEAR)
    label = label.resize((w, h), Image.NEAREST)
    canvas = Image.new("L", (-(-w // rate) * rate, -(-h // rate) * rate), 0)
    canvas.paste(label, (0, 0))
    label = canvas.resize((canvas.width // rate, canvas.height // rate), Image.NEAREST)
    return csail_image_tensor(image), np.asarray(label, dtype=np.int64) - 1


def csail_val_inputs(image: Image.Image, sizes, max_size: int, multiple: int):
    """CSAIL's ValDataset/TestDataset inputs: (1, 3, H_s, W_s) per short side."""
    inputs = []
    for side in sizes:
        h, w = csail_val_size(image.height, image.width, side, max_size, multiple)
        inputs.append(csail_image_tensor(image.resize((w, h), Image.BILINEAR)).unsqueeze(0))
    return inputs


@torch.no_grad()
def csail_scores(model, inputs, seg_size) -> torch.Tensor:
    """CSAIL's eval/test loop: zeros, then + softmax(feature logits resized once to the label
    size) / number of scales, per scale (its decoders with ``use_softmax`` and ``segSize``)."""
    scores = None
    for img in inputs:
        logits = model.decoder(model.encoder(img)).logits
        probs = F.softmax(F.interpolate(logits, size=tuple(seg_size), mode="bilinear",
                                        align_corners=False), dim=1)
        if scores is None:
            scores = torch.zeros(1, probs.shape[1], *seg_size)
        scores = scores + probs / len(inputs)
    return scores


def csail_image_counts(pred: np.ndarray, label: np.ndarray, num_class: int):
    """Per-image (correct, labelled, intersection[c], union[c]) by CSAIL's rules: predictions
    at unlabelled pixels (label -1) are not counted."""
    labelled = label >= 0
    p, t = pred[labelled], label[labelled]
    inter = np.array([np.sum((p == c) & (t == c)) for c in range(num_class)], np.int64)
    union = np.array([np.sum((p == c) | (t == c)) for c in range(num_class)], np.int64)
    return int(np.sum(p == t)), int(labelled.sum()), inter, union


def csail_style(state: dict) -> dict:
    """A state dict as CSAIL's files hold it: SyncBN running sums, no num_batches_tracked."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        out[key] = value
        if key.endswith("running_mean"):
            out[key.replace("running_mean", "_tmp_running_mean")] = value * 3
            out[key.replace("running_mean", "_tmp_running_var")] = torch.ones_like(value)
            out[key.replace("running_mean", "_running_iter")] = torch.full((1,), 3.0)
    return out


@functools.cache
def calibrated_model(encoder: str = "mobilenetv2dilated", decoder: str = "c1_deepsup",
                     num_class: int = 150, seed: int = 0, size: int = 32):
    """A model whose prediction varies over an image (BN statistics of synthetic scenes, no
    class bias): a random network's arg-max is one class everywhere, which hides errors.
    Shared (cached): callers must not change it."""
    from segmentation.data.synthetic import generate_scene
    from segmentation.data.transforms import normalize
    from segmentation.models import build_model

    torch.manual_seed(seed)
    model = build_model(encoder, decoder, num_class=num_class)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative averages
    rng = np.random.default_rng(seed)
    images = torch.stack([normalize(Image.fromarray(generate_scene(rng, size, size)[0]))
                          for _ in range(4)])
    with torch.no_grad():
        model.train()(images)
        model.decoder.conv_last.bias.zero_()
    for m in norms:
        m.momentum = 0.1
    return model.eval()
