"""Procedural street, landscape and room scenes in the ADEChallengeData2016 layout.

    python -m segmentation.data.synthetic --out DIR --train 200 --val 50 --size 96 [--seed 0]

Labels use the real ADE20K class ids. Every class draws its colour from a few shared, jittered
base colours, so colour alone is ambiguous: a model must use texture (stripes, bricks, window
grids, foliage, waves, ...), shape and layout. Output bytes depend only on the arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .make_odgt import make_odgt

# ADE20K class ids (1-based, as stored in annotation PNGs)
WALL, BUILDING, SKY, FLOOR, TREE, CEILING, ROAD = 1, 2, 3, 4, 5, 6, 7
WINDOW, GRASS, SIDEWALK, PERSON, DOOR, MOUNTAIN = 9, 10, 12, 13, 15, 17
CAR, WATER, PAINTING, RUG = 21, 22, 23, 29

# Shared base colours (RGB); each class picks among several, overlapping with other classes.
_COLOURS = {
    "grey": (128, 128, 128),
    "beige": (200, 180, 150),
    "blue": (90, 130, 200),
    "green": (70, 140, 60),
    "brown": (120, 85, 55),
    "dark": (60, 60, 70),
    "white": (215, 215, 210),
    "red": (170, 60, 50),
    "orange": (220, 150, 80),
}
_CLASS_COLOURS = {
    SKY: ("blue", "white", "grey", "orange"),
    WALL: ("beige", "white", "grey", "blue"),
    BUILDING: ("grey", "beige", "brown", "red"),
    FLOOR: ("brown", "grey", "beige", "red"),
    TREE: ("green", "dark", "brown", "orange"),
    CEILING: ("white", "beige", "grey"),
    ROAD: ("dark", "grey", "brown"),
    WINDOW: ("blue", "white", "dark"),
    GRASS: ("green", "brown", "orange"),
    SIDEWALK: ("grey", "beige", "red"),
    PERSON: ("red", "blue", "dark", "orange", "green"),
    DOOR: ("brown", "white", "red", "dark"),
    MOUNTAIN: ("brown", "grey", "green", "blue"),
    CAR: ("red", "blue", "white", "dark", "grey"),
    WATER: ("blue", "green", "grey", "dark"),
    PAINTING: ("orange", "red", "green", "blue"),
    RUG: ("red", "brown", "blue", "beige"),
}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Bilinearly interpolated Gaussian lattice noise with feature size ``cell`` pixels."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw))
    y = np.arange(h) / cell
    x = np.arange(w) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


# Textures: (rng, yy, xx) -> pattern roughly in [-1, 1]; yy/xx are pixel coordinate grids.
Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _flat(rng, yy, xx):
    return 0.15 * _smooth_noise(rng, *yy.shape, 12)


def _gradient(rng, yy, xx):
    h = yy.shape[0]
    return 0.6 * (yy / h - 0.5) + 0.2 * _smooth_noise(rng, *yy.shape, 20)


def _stripes(angle: float, period: tuple[float, float], square: bool = False) -> Texture:
    def tex(rng, yy, xx):
        theta = angle + rng.uniform(-0.2, 0.2)
        p = rng.uniform(*period)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / p)
        return np.sign(wave) * 0.5 if square else 0.5 * wave

    return tex


def _grid(cell: tuple[float, float], fill: float) -> Texture:
    """Bright/dark rectangles on a lattice: window rows of buildings, panes, tiles."""

    def tex(rng, yy, xx):
        cy, cx = rng.uniform(*cell), rng.uniform(*cell)
        inside = ((yy % cy) < cy * fill) & ((xx % cx) < cx * fill)
        return np.where(inside, -0.6, 0.4)

    return tex


def _bricks(rng, yy, xx):
    bh = rng.uniform(4, 7)
    row = np.floor(yy / bh)
    shifted = xx + (row % 2) * bh
    mortar = ((yy % bh) < 1) | ((shifted % (2 * bh)) < 1)
    return np.where(mortar, 0.7, -0.2) + 0.1 * _smooth_noise(rng, *yy.shape, 3)


def _foliage(rng, yy, xx):
    return np.tanh(1.5 * _smooth_noise(rng, *yy.shape, 2.5)) * 0.7


def _blades(rng, yy, xx):
    h, w = yy.shape
    cols = rng.standard_normal(w)[None, :] + 0.4 * _smooth_noise(rng, h, w, 6)
    return 0.5 * np.tanh(cols)


def _speckle(rng, yy, xx):
    return 0.45 * rng.standard_normal(yy.shape)


def _road(rng, yy, xx):
    lanes = 0.8 * ((np.abs((xx % 24) - 12) < 1.5) & ((yy % 10) < 5))
    return lanes + 0.25 * rng.standard_normal(yy.shape)


def _blocks(rng, yy, xx):
    return 0.7 * np.sign(_smooth_noise(rng, *yy.shape, 6))


_TEXTURES: dict[int, Texture] = {
    SKY: _gradient,
    WALL: _flat,
    BUILDING: _grid((5, 9), 0.5),
    FLOOR: _stripes(0.0, (5, 8)),
    TREE: _foliage,
    CEILING: _stripes(np.pi / 2, (6, 10), square=True),
    ROAD: _road,
    WINDOW: _grid((8, 14), 0.85),
    GRASS: _blades,
    SIDEWALK: _bricks,
    PERSON: _stripes(0, (3, 5)),
    DOOR: _stripes(0.0, (8, 12), square=True),
    MOUNTAIN: _stripes(np.pi / 4, (4, 7)),
    CAR: _speckle,
    WATER: _stripes(np.pi / 2, (3, 6)),
    PAINTING: _blocks,
    RUG: _stripes(np.pi / 4, (3, 5), square=True),
}


def _rect(label: np.ndarray, cls: int, y0, y1, x0, x1) -> None:
    h, w = label.shape
    label[max(0, int(y0)) : min(h, int(y1)), max(0, int(x0)) : min(w, int(x1))] = cls


def _ellipse(label, yy, xx, cls, cy, cx, ry, rx) -> None:
    label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = cls


def _person(label, yy, xx, rng, foot_y, cx, height) -> None:
    _ellipse(label, yy, xx, PERSON, foot_y - 0.45 * height, cx, 0.4 * height, 0.14 * height)
    _ellipse(label, yy, xx, PERSON, foot_y - 0.9 * height, cx, 0.1 * height, 0.1 * height)


def _car(label, yy, xx, rng, base_y, cx, length) -> None:
    height = length * rng.uniform(0.35, 0.5)
    _rect(
        label, CAR, base_y - 0.65 * height, base_y - 0.15 * height, cx - length / 2, cx + length / 2
    )
    _rect(label, CAR, base_y - height, base_y - 0.6 * height, cx - length / 4, cx + length / 4)
    for wheel in (cx - length / 3, cx + length / 3):
        _ellipse(label, yy, xx, CAR, base_y - 0.15 * height, wheel, 0.15 * height, 0.15 * height)


def _street(label, yy, xx, rng) -> None:
    h, w = label.shape
    horizon = rng.uniform(0.3, 0.55) * h
    label[:] = SKY
    x = 0.0
    while x < w:  # skyline of buildings and trees
        width = rng.uniform(0.15, 0.4) * w
        if rng.random() < 0.65:
            _rect(label, BUILDING, horizon - rng.uniform(0.15, 0.45) * h, horizon + 1, x, x + width)
        else:
            r = width / 2
            _ellipse(label, yy, xx, TREE, horizon - r * 0.8, x + r, r, r)
        x += width
    label[int(horizon) :] = SIDEWALK
    road_top = horizon + rng.uniform(0.1, 0.3) * (h - horizon)
    label[int(road_top) :] = ROAD
    if rng.random() < 0.5:
        _rect(label, GRASS, road_top - 0.35 * (road_top - horizon), road_top, 0, w)
    for _ in range(rng.integers(0, 3)):
        _car(
            label,
            yy,
            xx,
            rng,
            rng.uniform(road_top + 6, h),
            rng.uniform(0, w),
            rng.uniform(0.2, 0.4) * w,
        )
    for _ in range(rng.integers(0, 3)):
        _person(
            label,
            yy,
            xx,
            rng,
            rng.uniform(horizon + 2, road_top + 2),
            rng.uniform(0, w),
            rng.uniform(0.2, 0.4) * h,
        )


def _landscape(label, yy, xx, rng) -> None:
    h, w = label.shape
    horizon = rng.uniform(0.35, 0.6) * h
    label[:] = SKY
    peaks = rng.uniform(0.1, 0.4, size=5) * h
    ridge = horizon - np.interp(xx[0], np.linspace(0, w, 5), peaks)
    label[yy >= ridge[None, :]] = MOUNTAIN
    label[int(horizon) :] = WATER if rng.random() < 0.5 else GRASS
    if label[-1, 0] == WATER:
        _rect(label, GRASS, h - rng.uniform(0.1, 0.25) * h, h, 0, w)
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.08, 0.2) * h
        cx = rng.uniform(0, w)
        _rect(label, TREE, horizon - r, horizon + 0.3 * r, cx - 0.15 * r, cx + 0.15 * r)
        _ellipse(label, yy, xx, TREE, horizon - 1.3 * r, cx, r, 0.8 * r)
    if rng.random() < 0.6:
        _person(
            label,
            yy,
            xx,
            rng,
            rng.uniform(0.8, 1.0) * h,
            rng.uniform(0, w),
            rng.uniform(0.25, 0.45) * h,
        )


def _room(label, yy, xx, rng) -> None:
    h, w = label.shape
    ceiling = rng.uniform(0.05, 0.2) * h
    floor = rng.uniform(0.6, 0.8) * h
    label[:] = WALL
    label[: int(ceiling)] = CEILING
    label[int(floor) :] = FLOOR
    if rng.random() < 0.6:
        cx, ry = rng.uniform(0.2, 0.8) * w, rng.uniform(0.06, 0.12) * h
        _ellipse(label, yy, xx, RUG, (floor + h) / 2, cx, ry, rng.uniform(0.2, 0.35) * w)
    for cls in rng.permutation([WINDOW, DOOR, PAINTING]):
        if rng.random() < 0.3:
            continue
        width = rng.uniform(0.12, 0.25) * w
        x0 = rng.uniform(0, w - width)
        if cls == DOOR:
            _rect(label, DOOR, ceiling + 0.25 * (floor - ceiling), floor, x0, x0 + width)
        else:
            top = rng.uniform(ceiling + 2, ceiling + 0.4 * (floor - ceiling))
            _rect(
                label,
                int(cls),
                top,
                top + rng.uniform(0.25, 0.45) * (floor - ceiling),
                x0,
                x0 + width,
            )
    if rng.random() < 0.5:
        _person(
            label, yy, xx, rng, rng.uniform(floor, h), rng.uniform(0, w), rng.uniform(0.4, 0.6) * h
        )


_LAYOUTS = (_street, _landscape, _room)


def generate_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 ADE20K class-id map."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    label = np.zeros((height, width), dtype=np.uint8)
    _LAYOUTS[rng.integers(len(_LAYOUTS))](label, yy, xx, rng)
    image = np.zeros((height, width, 3))
    for cls in np.unique(label):
        names = _CLASS_COLOURS[int(cls)]
        base = np.array(_COLOURS[names[rng.integers(len(names))]], dtype=np.float64)
        base *= rng.uniform(0.75, 1.25, size=3)  # per-region colour jitter
        pattern = _TEXTURES[int(cls)](rng, yy, xx)
        mask = label == cls
        image[mask] = base * (1 + 0.5 * pattern[mask, None])
    image *= rng.uniform(0.8, 1.2, size=3)  # global white balance / exposure
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _scene_size(rng: np.random.Generator, short: int) -> tuple[int, int]:
    long = round(float(short * rng.uniform(1.0, 1.6)))
    return (short, long) if rng.random() < 0.75 else (long, short)  # mostly landscape


def make_synthetic_dataset(
    out: str | Path, *, train: int = 200, val: int = 50, size: int = 96, seed: int = 0
) -> dict[str, Path]:
    """Write ``out/images|annotations/{training,validation}`` and ``out/<split>.odgt``.

    File names follow ADE20K (``syn_train_00000001.jpg``). Returns split -> index path.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out)
    for split, count, stem, code in (
        ("training", train, "syn_train", 0),
        ("validation", val, "syn_val", 1),
    ):
        if count < 1:
            raise ValueError(f"{split} needs at least one image, got {count}")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            rng = np.random.default_rng([seed, code, i])  # per image: order-independent
            image, label = generate_scene(rng, *_scene_size(rng, size))
            name = f"{stem}_{i:08d}"
            Image.fromarray(image).save(out / "images" / split / f"{name}.jpg", quality=92)
            Image.fromarray(label, mode="L").save(out / "annotations" / split / f"{name}.png")
    return make_odgt(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, default=96, help="short side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = make_synthetic_dataset(
        args.out, train=args.train, val=args.val, size=args.size, seed=args.seed
    )
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
