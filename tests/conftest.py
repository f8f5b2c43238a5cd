"""Test-wide setup: GPU tests skip (with the reason) without a GPU; Triton is interpreted on CPU."""

import os

import pytest
import torch

# Must happen before triton is imported anywhere: on a GPU-less machine Triton kernels run on CPU
# tensors through the interpreter (how CI tests them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def cpu_build(request):
    """The test runs on the extension's CPU build ``request.param`` (parametrize indirectly with
    helpers.cpu_build_params); the previous build is restored afterwards."""
    from mishkit import backends

    extension, reason = backends.extension_module()
    if extension is None:
        pytest.skip(f"extension not built: {reason}")
    previous = extension.cpu_capability()
    extension.set_cpu_capability(request.param)
    yield request.param
    extension.set_cpu_capability(previous)
