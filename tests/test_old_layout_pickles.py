"""Full models pickled before the package layout changed still load and compute the same.

``data/old_layout_model.pt`` was written by :func:`write_fixture` with mishkit 0.1.0's flat layout,
so its pickle names ``mishkit.bn_act.BatchNormAct2d``, ``mishkit.bn_act.SyncBatchNormAct2d``,
``mishkit.fx_rewrite.RewrittenForward`` and ``mishkit.fx_rewrite._ShallowTracer`` (an fx graph
pickles its tracer class); those paths are kept as re-export shims.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mishkit

FIXTURE = Path(__file__).parent / "data" / "old_layout_model.pt"
OLD_PATHS = {"mishkit.bn_act.BatchNormAct2d", "mishkit.bn_act.SyncBatchNormAct2d",
             "mishkit.fx_rewrite.RewrittenForward", "mishkit.fx_rewrite._ShallowTracer"}


class Block(nn.Module):
    """A residual block with a functional ReLU (rewritten by fx) and a fusable bn -> add -> act."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + x)


def write_fixture(path: Path = FIXTURE) -> None:
    """How the fixture was made (run once, under the old layout)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(),
                          nn.SyncBatchNorm(4), nn.SiLU(), nn.Conv2d(4, 2, 1), nn.GELU())
    mishkit.convert(model, "mish", fuse_bn=True, functional=True)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    torch.save({"model": model, "input": x, "output": y}, path)


def _pickled_globals(path: Path) -> set[str]:
    """Every ``module.qualname`` the pickle refers to."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    import pickletools

    names, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif opcode.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
    return names


def test_fixture_uses_the_old_class_paths():
    assert _pickled_globals(FIXTURE) >= OLD_PATHS


def test_old_pickle_loads_and_computes_the_same():
    saved = torch.load(FIXTURE, weights_only=False)
    model = saved["model"]
    with torch.no_grad():
        y = model(saved["input"])
    torch.testing.assert_close(y, saved["output"], rtol=1e-6, atol=1e-6)
    fused = [m for m in model.modules() if isinstance(m, mishkit.nn.BatchNormAct2d)]
    assert len(fused) == 4
    assert any(isinstance(m, mishkit.nn.SyncBatchNormAct2d) for m in fused)


def test_old_pickle_resaves_under_the_new_paths(tmp_path):
    model = torch.load(FIXTURE, weights_only=False)["model"]
    path = tmp_path / "resaved.pt"
    torch.save({"model": model}, path)
    assert not (OLD_PATHS & _pickled_globals(path))
    assert pickle.loads(pickle.dumps(model)) is not None
