"""Evaluate a trained model on DATASET.list_val by the ADE20K protocol.

    python -m segmentation.eval --cfg CFG [KEY VALUE ...]
    torchrun --nproc_per_node=N -m segmentation.eval --cfg CFG [KEY VALUE ...]

``VAL.mode`` single | multi (CSAIL's VAL.imgSizes) | sliding (VAL.crop_size, VAL.stride);
``VAL.flip true`` adds flipped views. Writes ``metrics.json`` and the per-class table
(``class_iou.md``/``.csv``) to ``--out`` (default DIR/eval), and with ``VAL.visualize true``
image | ground truth | prediction strips to ``vis/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config
from .engine.distributed import cleanup, init_distributed
from .engine.logging import setup_logging
from .train import common_parser, load_or_exit


def checkpoint_path(cfg: Config) -> Path:
    """``VAL.checkpoint``: a path, or a file name inside DIR/checkpoints (default last.pth)."""
    name = cfg.VAL.checkpoint or "last.pth"
    path = Path(name)
    if path.is_file() or len(path.parts) > 1:
        return path
    ckpt_dir = Path(cfg.TRAIN.ckpt_dir or Path(cfg.DIR) / "checkpoints")
    return ckpt_dir / name


def load_trained_model(cfg: Config, ctx):
    """The configured model with ``VAL.checkpoint``'s weights, in eval mode on ``ctx.device``."""
    from .engine.builders import build_segmentation_model
    from .engine.checkpoint import CheckpointError, model_weights

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
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser("python -m segmentation.eval", __doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default DIR/eval)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(parser, args.cfg, args.opts)
    from .engine.builders import prepare_dataset
    from .engine.checkpoint import CheckpointError
    from .engine.evaluator import evaluate

    ctx = init_distributed(cfg.TRAIN.device)
    setup_logging(ctx.is_main)
    out_dir = Path(args.out or Path(cfg.DIR) / "eval")
    try:
        prepare_dataset(cfg, ctx)
        try:
            model = load_trained_model(cfg, ctx)
        except CheckpointError as err:
            parser.exit(1, f"{parser.prog}: error: {err}\n")
        result = evaluate(model, cfg, ctx, out_dir=out_dir, progress=ctx.is_main)
        if ctx.is_main:
            print(json.dumps(result.summary, indent=2))
            print(f"per-class table: {out_dir / 'class_iou.md'}")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
