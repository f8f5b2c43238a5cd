"""Evaluate a trained model on DATASET.list_val by the ADE20K protocol.

    python -m segmentation.eval --cfg CFG [KEY VALUE ...]
    torchrun --nproc_per_node=N -m segmentation.eval --cfg CFG [KEY VALUE ...]

Weights: ``VAL.checkpoint`` (one of our checkpoints), or, when ``MODEL.weights_decoder`` is
set, CSAIL's pair of files ``MODEL.weights_encoder`` / ``MODEL.weights_decoder``
(``encoder_epoch_N.pth`` / ``decoder_epoch_N.pth``, local paths or URLs). ``VAL.mode`` single |
multi (CSAIL's multi-scale protocol over VAL.imgSizes) | sliding (VAL.crop_size, VAL.stride);
``VAL.flip true`` adds flipped views. Writes ``metrics.json``, the per-class table
(``class_iou.md``/``.csv``) and ``per_image.jsonl`` to ``--out`` (default DIR/eval), and with
``VAL.visualize true`` image | ground truth | prediction strips to ``vis/``. Prints the numbers
in the form of CSAIL's results table, with the protocol they were measured under.
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from .config import Config
from .engine.distributed import cleanup, init_distributed
from .engine.logging import setup_logging
from .train import common_parser, load_or_exit

log = logging.getLogger(__name__)


def checkpoint_path(cfg: Config) -> Path:
    """``VAL.checkpoint``: a path, or a file name inside DIR/checkpoints (default last.pth)."""
    name = cfg.VAL.checkpoint or "last.pth"
    path = Path(name)
    if path.is_file() or len(path.parts) > 1:
        return path
    ckpt_dir = Path(cfg.TRAIN.ckpt_dir or Path(cfg.DIR) / "checkpoints")
    return ckpt_dir / name


def uses_csail_weights(cfg: Config) -> bool:
    """Whether the weights come from MODEL.weights_encoder/decoder (CSAIL's two files)."""
    return bool(cfg.MODEL.weights_decoder)


def _load_csail_weights(cfg: Config, ctx):
    from .engine.builders import build_segmentation_model
    from .engine.checkpoint import CheckpointError
    from .models.weights import CheckpointMismatchError

    encoder, decoder = cfg.MODEL.weights_encoder, cfg.MODEL.weights_decoder
    if not encoder or encoder.lower() == "imagenet":
        raise CheckpointError(
            f"MODEL.weights_decoder is {decoder!r}, so the model is evaluated from CSAIL-layout "
            f"files, but MODEL.weights_encoder is {encoder!r}: set it to the matching "
            "encoder_epoch_N.pth (path or URL)")
    try:
        model = build_segmentation_model(cfg, ctx, pretrained=True)
    except (CheckpointMismatchError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from None
    except urllib.error.URLError as err:
        raise CheckpointError(f"cannot download {encoder} / {decoder}: {err}") from None
    log.info("weights: encoder %s, decoder %s (VAL.checkpoint not used)", encoder, decoder)
    return model


def load_trained_model(cfg: Config, ctx):
    """The configured model with trained weights, in eval mode on ``ctx.device``: CSAIL's
    ``MODEL.weights_encoder``/``weights_decoder`` when the decoder's is set, otherwise
    ``VAL.checkpoint``."""
    from .engine.builders import build_segmentation_model
    from .engine.checkpoint import CheckpointError, model_weights

    if uses_csail_weights(cfg):
        return _load_csail_weights(cfg, ctx).eval()
    model = build_segmentation_model(cfg, ctx, pretrained=False)
    path = checkpoint_path(cfg)
    try:
        model.load_state_dict(model_weights(path))
    except RuntimeError as err:
        if isinstance(err, CheckpointError):
            raise
        arch = f"{cfg.MODEL.arch_encoder}+{cfg.MODEL.arch_decoder}"
        raise CheckpointError(f"{path}: weights do not fit the configured model ({arch}): "
                              f"{err}") from None
    log.info("weights: %s", path)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser("python -m segmentation.eval", __doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default DIR/eval)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(parser, args.cfg, args.opts)
    from .engine.builders import prepare_dataset
    from .engine.checkpoint import CheckpointError
    from .engine.evaluator import PER_IMAGE_FILE, csail_summary_line, evaluate

    ctx = init_distributed(cfg.TRAIN.device)
    setup_logging(ctx.is_main)
    out_dir = Path(args.out or Path(cfg.DIR) / "eval")
    try:
        prepare_dataset(cfg, ctx)
        try:
            model = load_trained_model(cfg, ctx)
        except CheckpointError as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        result = evaluate(model, cfg, ctx, out_dir=out_dir, per_image=out_dir / PER_IMAGE_FILE,
                          progress=ctx.is_main)
        if ctx.is_main:
            summary = result.summary
            print(json.dumps({"protocol": result.protocol, **summary}, indent=2))
            print(f"per-class table: {out_dir / 'class_iou.md'}; per-image records: "
                  f"{out_dir / PER_IMAGE_FILE}")
            print(f"mean over images: mIoU {100 * summary['per_image_miou']:.2f}, "
                  f"mDice {100 * summary['per_image_mdice']:.2f}")
            print(f"[Eval Summary] {summary['images']} images, {result.protocol}:\n"
                  f"{csail_summary_line(summary)}")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
