"""Segment images with a trained model.

    python -m segmentation.infer --cfg CFG --imgs PATH_OR_DIR --out DIR [KEY VALUE ...]

For each image writes ``<stem>_color.png`` (palette colours) and ``<stem>.png`` (labels in the
ADE20K submission space 1..150), and prints the predicted classes by area with their names.
The checkpoint is ``VAL.checkpoint``; scales, flip and sliding window follow ``VAL.*``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import Config
from .data import DatasetError
from .data.make_odgt import IMAGE_SUFFIXES
from .data.transforms import load_image, normalize, resize_image, round_up, scaled_size
from .engine.distributed import DistContext, resolve_device
from .engine.logging import setup_logging
from .train import common_parser, load_or_exit


def image_paths(source: str | Path) -> list[Path]:
    """One image, or every image (sorted) directly inside a folder."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DatasetError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if not source.is_file():
        raise DatasetError(f"{source}: no such image or folder")
    return [source]


def scaled_inputs(image: Image.Image, sizes: Sequence[int], cfg: Config) -> list[torch.Tensor]:
    """The image at each short side, resized to multiples of DATASET.padding_constant."""
    inputs = []
    for short_side in sizes:
        h, w = scaled_size(image.height, image.width, short_side, cfg.VAL.imgMaxSize)
        multiple = cfg.DATASET.padding_constant
        size = (round_up(h, multiple), round_up(w, multiple))
        inputs.append(normalize(resize_image(image, size)).unsqueeze(0))
    return inputs


def class_areas(pred: np.ndarray, names: Sequence[str] | None) -> list[tuple[str, float]]:
    """``(name, fraction of the image)`` for every predicted class, largest first."""
    counts = np.bincount(pred.ravel(), minlength=1)
    order = np.argsort(-counts, kind="stable")
    return [(names[c] if names else str(c), counts[c] / pred.size) for c in order if counts[c]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser("python -m segmentation.infer", __doc__.split("\n")[0])
    parser.add_argument("--imgs", required=True, help="an image or a folder of images")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(parser, args.cfg, args.opts)
    from .engine.checkpoint import CheckpointError
    from .engine.evaluator import class_names_for, eval_sizes, predict_scores
    from .eval import load_trained_model
    from .visualize import colorize

    setup_logging(True)
    ctx = DistContext(device=resolve_device(cfg.TRAIN.device))
    try:
        paths = image_paths(args.imgs)
        model = load_trained_model(cfg, ctx)
    except (DatasetError, CheckpointError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    if cfg.DATASET.num_class > 255:
        parser.exit(2, f"{parser.prog}: error: label PNGs hold at most 255 classes\n")
    names = class_names_for(cfg.DATASET.num_class)  # ADE20K names; indices otherwise
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = eval_sizes(cfg)
    for path in paths:
        try:
            image = load_image(path)
        except DatasetError as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        inputs = [x.to(ctx.device) for x in scaled_inputs(image, sizes, cfg)]
        scores = predict_scores(model, inputs, (image.height, image.width), cfg)
        pred = scores.argmax(1)[0].cpu().numpy()
        Image.fromarray(colorize(pred)).save(out / f"{path.stem}_color.png")
        Image.fromarray((pred + 1).astype(np.uint8), mode="L").save(out / f"{path.stem}.png")
        areas = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in class_areas(pred, names))
        print(f"{path.name}: {areas}")
    print(f"wrote {2 * len(paths)} PNGs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
