"""Write ``training.odgt`` / ``validation.odgt`` for a folder in the ADEChallengeData2016 layout.

    python -m segmentation.data.make_odgt ROOT [--splits training validation]

``ROOT/images/<split>/*.jpg`` pairs with ``ROOT/annotations/<split>/<same stem>.png``; the index
is written to ``ROOT/<split>.odgt`` with paths relative to ``ROOT``'s parent (as the official
files), so :func:`segmentation.data.dataset.default_root` finds the base directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError
from .odgt import Record, write_odgt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("training", "validation")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None


def index_split(root: str | Path, split: str) -> list[Record]:
    """Records for ``root/images/<split>``, sorted by file name; every image needs its PNG."""
    root = Path(root).resolve()
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    records = []
    for img_path in images:
        segm_path = root / "annotations" / split / (img_path.stem + ".png")
        if not segm_path.is_file():
            raise DatasetError(f"{img_path}: annotation {segm_path} not found")
        width, height = _image_size(img_path)
        records.append(
            Record(
                fpath_img=img_path.relative_to(root.parent).as_posix(),
                fpath_segm=segm_path.relative_to(root.parent).as_posix(),
                width=width,
                height=height,
            )
        )
    return records


def make_odgt(root: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """Write ``root/<split>.odgt`` for each split; returns split -> written path."""
    root = Path(root)
    return {split: write_odgt(root / f"{split}.odgt", index_split(root, split)) for split in splits}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.data.make_odgt", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", type=Path, help="dataset root holding images/ and annotations/")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS))
    args = parser.parse_args(argv)
    try:
        written = make_odgt(args.root, args.splits)
    except DatasetError as err:
        parser.exit(1, f"error: {err}\n")
    for split, path in written.items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{split}: {count} records -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
