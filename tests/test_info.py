"""`python -m mishkit info` and the import-time fallback, with and without a loadable extension.

Each case runs a fresh interpreter over a copy of the package, so what is tested is the real
import path: a missing `_C`, a broken `_C` (an unloadable file, as after an ABI mismatch), and the
built one when it exists.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mishkit

PACKAGE = Path(mishkit.__file__).parent
BUILT = sorted(PACKAGE.glob("_C*.so"))


# An editable install adds a meta-path finder that would resolve `mishkit._C` back to the source
# tree; drop it so the copied package is the only mishkit the child interpreter sees.
ISOLATE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
           "(getattr(f, '__module__', '') + type(f).__module__)];")


def run_python(package_parent: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    env.pop("MISHKIT_DISABLE_EXT", None)
    return subprocess.run([sys.executable, "-W", "default", "-c", ISOLATE + code],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=120)


def run_info(package_parent: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(package_parent, f"import mishkit.__main__ as m; m.main({['info', *args]!r})")


def copy_package(tmp_path: Path, with_extension: bool) -> Path:
    ignored = ["__pycache__"] if with_extension else ["__pycache__", "_C*"]
    shutil.copytree(PACKAGE, tmp_path / "mishkit", ignore=shutil.ignore_patterns(*ignored))
    return tmp_path


def test_info_without_extension_falls_back_and_says_why(tmp_path):
    result = run_info(copy_package(tmp_path, with_extension=False), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["extension"]["loaded"] is False
    assert "not built" in info["extension"]["reason"]
    assert info["backends"]["torch"] == "available"
    assert "not built" in info["backends"]["cpu"]
    assert set(info["activations"]) == set(mishkit.ACTIVATIONS)
    assert result.stderr.count("C++/CUDA kernels unavailable") == 1  # one clear warning


def test_broken_extension_reports_the_loader_message(tmp_path):
    root = copy_package(tmp_path, with_extension=False)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (root / "mishkit" / f"_C{suffix}").write_bytes(b"not a shared object" * 512)
    result = run_info(root, "--json")
    assert result.returncode == 0, result.stderr
    reason = json.loads(result.stdout)["extension"]["reason"]
    assert "failed to load" in reason and "invalid ELF header" in reason


def test_functional_works_without_extension(tmp_path):
    root = copy_package(tmp_path, with_extension=False)
    code = ("import torch, mishkit.functional as F; x = torch.linspace(-3, 3, 7);"
            "assert torch.allclose(F.mish(x), torch.nn.functional.mish(x)); print('ok')")
    result = run_python(root, code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not BUILT, reason="mishkit._C is not built in this checkout")
def test_info_with_extension(tmp_path):
    result = run_info(copy_package(tmp_path, with_extension=True), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["extension"]["loaded"] is True and info["extension"]["reason"] is None
    assert info["backends"]["cpu"] == "available"
    assert info["extension"]["cpu_capability"] in {"default", "avx2", "avx512"}
    if not info["extension"]["with_cuda"]:
        assert "built without CUDA" in info["backends"]["cuda"]
    assert "C++/CUDA kernels unavailable" not in result.stderr


def test_info_text_output_lists_backends_and_activations():
    result = subprocess.run([sys.executable, "-m", "mishkit", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "backends:", "triton", "mish", "swish", "negative_slope=0.01"):
        assert word in result.stdout
