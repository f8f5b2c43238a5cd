"""``python -m mishkit plot [names...] --out DIR``: pictures of the registered activations.

Three kinds of PNG, drawn from the registry's float64 formulas:

- ``<name>.png``: the activation with its first and second derivatives over [-6, 6];
- ``activations_grid.png``: every requested activation and its derivative, one panel each;
- ``landscapes.png``: the output of one small random network (same weights for every panel)
  over a 2-D input plane under each activation: smooth activations give smooth landscapes.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from .backends.autograd import second_derivative
from .registry import ACTIVATIONS, ActivationSpec, get_spec

X_RANGE = (-6.0, 6.0)
CURVES = ("f(x)", "f'(x)", "f''(x)")


def curves(spec: ActivationSpec, points: int = 1201) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x over X_RANGE and [f, f', f''] there, in float64 with default parameters."""
    x = torch.linspace(*X_RANGE, points, dtype=torch.float64)
    params = dict(spec.params)
    values = [spec.reference(x, **params), spec.derivative(x, **params)]
    values.append(second_derivative(spec, x, tuple(params.values())))
    return x, values


class RandomNetwork:
    """A fixed random MLP R^2 -> R whose hidden activation is swapped per panel."""

    def __init__(self, width: int = 64, depth: int = 5, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        sizes = [2, *([width] * depth), 1]
        self.layers = [
            (torch.randn(n_out, n_in, generator=generator, dtype=torch.float64)
             * math.sqrt(2.0 / n_in),
             torch.randn(n_out, generator=generator, dtype=torch.float64) * 0.1)
            for n_in, n_out in itertools.pairwise(sizes)
        ]

    def __call__(self, points: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
        h, params = points, dict(spec.params)
        for weight, bias in self.layers[:-1]:
            h = spec.reference(h @ weight.T + bias, **params)
        weight, bias = self.layers[-1]
        return (h @ weight.T + bias).squeeze(-1)


def landscape(spec: ActivationSpec, network: RandomNetwork, resolution: int,
              extent: float = 5.0) -> torch.Tensor:
    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    return network(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2), spec).reshape(
        resolution, resolution)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_activation(spec: ActivationSpec, out_dir: Path) -> Path:
    plt = _pyplot()
    x, values = curves(spec)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y, style in zip(CURVES, values, ("-", "--", ":")):
        ax.plot(x, y, style, linewidth=2, label=label)
    ax.axhline(0, color="k", linewidth=0.6)
    ax.axvline(0, color="k", linewidth=0.6)
    ax.set_xlim(*X_RANGE)
    ax.set_ylim(-2.0, 6.0)
    ax.set_title(f"{spec.name}: {spec.formula}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out_dir / f"{spec.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _panel_grid(count: int, width: float, height: float):
    plt = _pyplot()
    cols = min(count, 5)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def draw_grid(specs: list[ActivationSpec], out_dir: Path) -> Path:
    plt, fig, axes = _panel_grid(len(specs), 3.0, 2.5)
    for ax, spec in zip(axes, specs):
        x, (f, df, _) = curves(spec, 601)
        ax.plot(x, f, linewidth=1.8, label="f")
        ax.plot(x, df, "--", linewidth=1.2, label="f'")
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_ylim(-2.0, 6.0)
        ax.set_title(spec.name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out_dir / "activations_grid.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_landscapes(specs: list[ActivationSpec], out_dir: Path, resolution: int,
                    seed: int) -> Path:
    network = RandomNetwork(seed=seed)
    plt, fig, axes = _panel_grid(len(specs), 3.0, 3.0)
    for ax, spec in zip(axes, specs):
        ax.imshow(landscape(spec, network, resolution).numpy(), cmap="viridis", origin="lower")
        ax.set_title(spec.name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("output landscape of one random 5-layer network", fontsize=10)
    fig.tight_layout()
    path = out_dir / "landscapes.png"
    fig.savefig(path, dpi=72)  # smooth images compress badly: keep the file small
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="activations to draw (default: all registered)")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="output folder")
    parser.add_argument("--resolution", type=int, default=200,
                        help="landscape pixels per side (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random network seed")


def run(args: argparse.Namespace) -> int:
    try:
        chosen = {get_spec(n).name: get_spec(n) for n in args.names}  # aliases count once
    except ValueError as exc:
        raise SystemExit(f"plot: {exc}") from None
    specs = list(chosen.values()) or list(ACTIVATIONS.values())
    if args.resolution < 2:
        raise SystemExit(f"plot: --resolution must be at least 2, got {args.resolution}")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [draw_activation(spec, args.out) for spec in specs]
    paths.append(draw_grid(specs, args.out))
    paths.append(draw_landscapes(specs, args.out, args.resolution, args.seed))
    print(f"wrote {len(paths)} PNG(s) to {args.out}: " + ", ".join(p.name for p in paths))
    return 0
