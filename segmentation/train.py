"""Train a scene-parsing model.

    python -m segmentation.train --cfg CFG [KEY VALUE ...]
    torchrun --nproc_per_node=N -m segmentation.train --cfg CFG [KEY VALUE ...]

``KEY VALUE`` pairs override the config (``TRAIN.num_epoch 2 MODEL.activation mish``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .config import ConfigError, load_config
from .engine.distributed import cleanup, init_distributed
from .engine.logging import setup_logging


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cfg", required=True, help="YAML config (segmentation/configs/*.yaml)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. TRAIN.batch_size_per_gpu 4")
    return parser


def load_or_exit(parser: argparse.ArgumentParser, path: str, opts: Sequence[str]):
    """The config, or exit with status 2 and the error (unknown key, bad value) on stderr."""
    try:
        cfg = load_config(path, opts)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if cfg.TRAIN.num_threads > 0:
        torch.set_num_threads(cfg.TRAIN.num_threads)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser("python -m segmentation.train", __doc__.split("\n")[0])
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from ('auto': DIR/checkpoints/last.pth)")
    args = parser.parse_intermixed_args(argv)
    opts = list(args.opts) + (["TRAIN.resume", args.resume] if args.resume else [])
    cfg = load_or_exit(parser, args.cfg, opts)
    from .engine.trainer import Trainer  # heavy imports after argument errors are reported

    ctx = init_distributed(cfg.TRAIN.device)
    setup_logging(ctx.is_main)
    try:
        trainer = Trainer(cfg, ctx)
        result = trainer.train()
        trainer.close()
        if ctx.is_main:
            print(f"trained {result['iteration']} iterations "
                  f"({result['images_per_s']:.1f} images/s); outputs in {trainer.out_dir}")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
