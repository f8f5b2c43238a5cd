"""Segment images with a trained model.

    python -m segmentation.infer --cfg CFG --imgs PATH_OR_DIR --out DIR [KEY VALUE ...]

A folder is searched recursively (as CSAIL's test.py does); each image's outputs keep its path
relative to the folder: ``<stem>_color.png`` (palette colours) and ``<stem>.png`` (labels in the
ADE20K submission space 1..150). Prints the predicted classes by area with their names. Weights
as in ``segmentation.eval``: ``VAL.checkpoint``, or CSAIL's ``MODEL.weights_encoder`` /
``MODEL.weights_decoder``; scales, flip and sliding window follow ``VAL.*``, and the scores are
computed at the image's own size exactly as the evaluation computes them at the label's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DatasetError
from .data.make_odgt import IMAGE_SUFFIXES
from .data.transforms import eval_inputs, load_image
from .engine.distributed import DistContext, resolve_device
from .engine.logging import setup_logging
from .train import common_parser, load_or_exit


def image_paths(source: str | Path) -> list[Path]:
    """One image, or every image (sorted) anywhere below a folder."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise DatasetError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or "
                               "its subfolders")
        return paths
    if not source.is_file():
        raise DatasetError(f"{source}: no such image or folder")
    return [source]


def output_stem(path: Path, source: str | Path) -> Path:
    """Where an image's outputs go, relative to ``--out``: its path below the searched folder
    without the suffix (two images with one name in different folders never collide)."""
    source = Path(source)
    relative = path.relative_to(source) if source.is_dir() else Path(path.name)
    return relative.with_suffix("")


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
    if cfg.DATASET.num_class > 255:
        parser.exit(2, f"{parser.prog}: error: label PNGs hold at most 255 classes\n")
    try:
        paths = image_paths(args.imgs)
        stems = [output_stem(path, args.imgs) for path in paths]
        owner: dict[Path, Path] = {}
        for path, stem in zip(paths, stems):
            if stem in owner:
                raise DatasetError(f"{owner[stem]} and {path} would both write {stem}.png; "
                                   "rename one of them")
            owner[stem] = path
        model = load_trained_model(cfg, ctx)
    except (DatasetError, CheckpointError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    names = class_names_for(cfg.DATASET.num_class)  # ADE20K names; indices otherwise
    out = Path(args.out)
    sizes = eval_sizes(cfg)
    for path, relative in zip(paths, stems):
        try:
            image = load_image(path)
        except DatasetError as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        inputs = eval_inputs(image, sizes, cfg.VAL.imgMaxSize, cfg.DATASET.padding_constant)
        inputs = [x.unsqueeze(0).to(ctx.device) for x in inputs]
        scores = predict_scores(model, inputs, (image.height, image.width), cfg)
        pred = scores.argmax(1)[0].cpu().numpy()
        stem = out / relative
        stem.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colorize(pred)).save(f"{stem}_color.png")
        Image.fromarray((pred + 1).astype(np.uint8)).save(f"{stem}.png")  # mode L
        areas = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in class_areas(pred, names))
        print(f"{relative.with_suffix(path.suffix)}: {areas}")
    print(f"wrote {2 * len(paths)} PNGs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
