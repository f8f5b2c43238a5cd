"""The CUDA and Triton backends on CUDA tensors (run by benchmarks/gpu_suite.sh on a GPU)."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mishkit
import mishkit.functional as MF
from mishkit.registry import ACTIVATIONS

from .helpers import PARAMS, TOLERANCE, assert_close, reference, reference_grad
from .test_activations import away_from_kinks, grid

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
NAMES = list(ACTIVATIONS)


def require(backend):
    reason = mishkit.backends.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"GPU backend {backend} unavailable on a GPU machine: {reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_match_float64_reference(name, dtype, backend):
    require(backend)
    params = PARAMS.get(name, {})
    x = grid(dtype).cuda().requires_grad_(True)
    y = MF.activation(x, name, backend=backend, **params)
    assert_close(y.detach().cpu(), reference(name, x.detach().cpu(), **params), dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad.cuda())
    assert_close(grad_x.cpu(), reference_grad(name, x.detach().cpu(), grad, **params), dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck(name, backend):
    require(backend)
    params = PARAMS.get(name, {})
    x = away_from_kinks(torch.randn(24, dtype=torch.float64) * 3).cuda().requires_grad_(True)

    def fn(t):
        return MF.activation(t, name, backend=backend, **params)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_and_odd_sizes_and_channels_last(backend):
    require(backend)
    base = torch.randn(4099, device="cuda")
    for x in (base[1:], base[3:1030], base[:17]):  # 4-byte offsets defeat 16-byte vector loads
        torch.testing.assert_close(MF.mish(x, backend=backend).cpu(),
                                   reference("mish", x.cpu()).float(), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 8, 5, 3, device="cuda").contiguous(memory_format=torch.channels_last)
    y = MF.silu(x, backend=backend)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y.cpu(), reference("silu", x.cpu()).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_over_2_pow_31_elements_bf16(backend):
    require(backend)
    n = 2**31 + 4099
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(-6, 6)
    with torch.no_grad():
        y = MF.mish(x, backend=backend)
    tail = slice(n - 70000, n)  # beyond 2^31: wrong int32 indexing would leave these unwritten
    assert_close(y[tail].cpu(), reference("mish", x[tail].cpu()), torch.bfloat16)
    del y
    grad = torch.ones_like(x)
    grad_x = torch.ops.mishkit.act_backward(grad, x, "mish", []) if backend == "cuda" else \
        torch.ops.mishkit.triton_act_backward(grad, x, "mish", [])
    assert_close(grad_x[tail].cpu(), reference_grad("mish", x[tail].cpu(), grad[tail].cpu()),
                 torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_streams(backend):
    require(backend)
    side = torch.cuda.Stream()
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = MF.gelu(x, backend=backend)
        y.backward(torch.ones_like(y))
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y.detach().cpu(), reference("gelu", x.detach().cpu()).float(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), reference_grad("gelu", x.detach().cpu(),
                               torch.ones(x.shape)).float(), rtol=1e-5, atol=1e-6)


def test_device_mismatch_is_a_clear_error():
    require("cuda")
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match=r"(?i)device"):
        torch.ops.mishkit.act_backward(torch.randn(8), x, "mish", [])


@pytest.mark.parametrize("name", NAMES)
def test_opcheck_cuda_ops(name):
    require("cuda")
    params = list(ACTIVATIONS[name].bind((), PARAMS.get(name, {})))
    x = away_from_kinks(torch.randn(64)).cuda()
    torch.library.opcheck(torch.ops.mishkit.act_forward, (x.requires_grad_(True), name, params))
    torch.library.opcheck(torch.ops.mishkit.act_backward,
                          (torch.randn_like(x), x.detach(), name, params))


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                    reason="compute-sanitizer not on PATH")
def test_compute_sanitizer_memcheck():
    require("cuda")
    script = textwrap.dedent("""
        import torch, mishkit.functional as MF
        from mishkit.registry import ACTIVATIONS
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            base = torch.randn(1037, device="cuda", dtype=dtype)
            for x in (base, base[1:], base[5:21]):  # packs, prefix + packs + suffix, scalar
                for name in ACTIVATIONS:
                    xg = x.detach().requires_grad_(True)
                    MF.activation(xg, name, backend="cuda").sum().backward()
                    with torch.no_grad():  # in place on a view: one pointer, same prefix
                        MF.activation(base.clone()[1:], name, inplace=True, backend="cuda")
        torch.cuda.synchronize()
        print("clean")
    """)
    result = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                             sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "clean" in result.stdout, result.stdout + result.stderr
