"""`python -m mishkit plot`: the curves it draws are the right functions, and the PNGs appear."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mishkit import plot
from mishkit.__main__ import main
from mishkit.registry import ACTIVATIONS, get_spec


def test_mish_curves_match_the_closed_form_and_its_derivatives():
    x, (f, df, d2f) = plot.curves(get_spec("mish"))
    assert x[0] == plot.X_RANGE[0] and x[-1] == plot.X_RANGE[1]
    torch.testing.assert_close(f, x * torch.tanh(torch.log1p(torch.exp(x))))
    # central differences of the drawn curves: f' and f'' are the derivatives of what is drawn
    h = x[1] - x[0]
    torch.testing.assert_close(df[1:-1], (f[2:] - f[:-2]) / (2 * h), atol=1e-4, rtol=0)
    torch.testing.assert_close(d2f[1:-1], (df[2:] - df[:-2]) / (2 * h), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_second_derivative_matches_finite_differences_away_from_kinks(name):
    x, (_, df, d2f) = plot.curves(get_spec(name))
    h = x[1] - x[0]
    numeric = (df[2:] - df[:-2]) / (2 * h)
    smooth = (numeric - d2f[1:-1]).abs() < 1e-3
    # piecewise activations disagree only in the few samples that straddle a kink
    assert (~smooth).sum() <= 4


def test_landscape_is_deterministic_and_depends_on_the_activation():
    network = plot.RandomNetwork(width=8, depth=3, seed=1)
    mish = plot.landscape(get_spec("mish"), network, 12)
    assert mish.shape == (12, 12) and torch.isfinite(mish).all()
    torch.testing.assert_close(mish, plot.landscape(get_spec("mish"),
                                                    plot.RandomNetwork(8, 3, seed=1), 12))
    assert not torch.allclose(mish, plot.landscape(get_spec("relu"), network, 12))


def test_landscape_of_relu_network_is_positively_homogeneous_without_bias():
    # an independent property: with zero biases a ReLU MLP satisfies f(2p) = 2 f(p)
    network = plot.RandomNetwork(width=8, depth=3, seed=2)
    network.layers = [(w, torch.zeros_like(b)) for w, b in network.layers]
    points = torch.randn(50, 2, dtype=torch.float64)
    relu = get_spec("relu")
    torch.testing.assert_close(network(2 * points, relu), 2 * network(points, relu))


def test_cli_writes_the_pngs(tmp_path, capsys):
    assert main(["plot", "mish", "swish", "--out", str(tmp_path), "--resolution", "16"]) == 0
    for name in ("mish.png", "silu.png", "activations_grid.png", "landscapes.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert "wrote 4 PNG(s)" in capsys.readouterr().out


def test_cli_rejects_unknown_names_and_bad_resolution(tmp_path):
    with pytest.raises(SystemExit, match="unknown activation 'mush'"):
        main(["plot", "mush", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--resolution"):
        main(["plot", "mish", "--out", str(tmp_path), "--resolution", "1"])
