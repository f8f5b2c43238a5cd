"""The CUDA kernels of csrc/cuda/*.cu, run on the CPU.

The kernel files compile as host C++ against tests/cuda_emulation/cuda_emulation.h, which runs
every launch's blocks on CPU threads (``__syncthreads`` is a barrier). That checks, without a
GPU, what the kernels compute: indexing, the 16-byte pack paths with their scalar prefix and
suffix, grid-stride loops, both BatchNorm layouts, the Welford and share merges and the launch
configurations, against the float64 registry formulas and the torch backend. Device intrinsics,
timing and real memory faults are for the GPU suite (benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mishkit.backends import inversion, reference_output
from mishkit.backends import reference as torch_backend
from mishkit.registry import ACTIVATIONS

from .helpers import DTYPES, SPECIAL, assert_close, param_list
from .helpers import kernel_expected as expected

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
HEADERS = [ROOT / "csrc" / "activations.h", *sorted((ROOT / "csrc" / "cuda").glob("*.h*")),
           *sorted(EMULATION.iterdir())]
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-DMISHKIT_CUDA_EMULATION",
         f"-I{EMULATION}", f"-I{ROOT / 'csrc'}", f"-I{CUDA_INCLUDE}"]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
NAMES = list(ACTIVATIONS)  # kernel ids are registry positions (tests/test_extension.py)
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {
    "emu_act_forward": [INT, INT, PTR, PTR, I64, PTR],
    "emu_act_backward": [INT, INT, PTR, PTR, PTR, I64, PTR],
    "emu_bn_workspace_bytes": [INT, I64, I64, I64, INT, ctypes.POINTER(I64)],
    "emu_bn_stats": [PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR],
    "emu_bn_forward": [PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR, PTR, INT, PTR],
    "emu_bn_backward_reduce": [PTR, PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR, PTR, PTR, PTR,
                               INT, PTR],
    "emu_bn_backward_elemt": [PTR, PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR, PTR, PTR, PTR,
                              INT, PTR],
    "emu_bn_output_forward": [PTR, PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR, ctypes.c_double,
                              PTR, PTR, INT, PTR],
    "emu_bn_output_backward_reduce": [PTR, PTR, PTR, PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR,
                                      ctypes.c_double, ctypes.c_double, PTR, PTR, PTR, INT, PTR],
    "emu_bn_output_backward_elemt": [PTR, PTR, PTR, PTR, INT, I64, I64, I64, INT, PTR, PTR, PTR,
                                     PTR, PTR, PTR, ctypes.c_double, ctypes.c_double, PTR, PTR,
                                     INT, PTR],
}


def _build() -> Path:
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    out = ROOT / "build" / "cuda-emulation" / f"kernels-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    objects = [out.with_name(f"{out.stem}-{source.stem}.o") for source in SOURCES]
    jobs = [subprocess.Popen(["g++", *FLAGS, "-x", "c++", "-c", str(source), "-o", str(obj)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for source, obj in zip(SOURCES, objects)]  # the kernel files compile side by side
    for job, source in zip(jobs, SOURCES):
        output = job.communicate(timeout=900)[0]
        if job.returncode != 0:
            pytest.fail(f"compiling {source.name} for CPU emulation failed:\n{output}")
    partial = out.with_suffix(".tmp")
    subprocess.run(["g++", *FLAGS, "-shared", *map(str, objects),
                    str(EMULATION / "exports.cpp"), "-o", str(partial)], check=True,
                   capture_output=True, timeout=300)
    partial.rename(out)  # atomic: a parallel run never loads a half-written library
    return out


@pytest.fixture(scope="module")
def lib():
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").exists():
        pytest.skip(f"needs g++ and the CUDA headers ({CUDA_INCLUDE}) to compile the kernels "
                    "as host code")
    library = ctypes.CDLL(str(_build()))
    for name, argtypes in SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = INT
    return library


def ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def doubles(values) -> ctypes.Array:
    return (ctypes.c_double * 2)(*[*values, 0.0, 0.0][:2])


def poisoned(n: int, dtype: torch.dtype, offset: int = 0, guard: int = 8) -> torch.Tensor:
    """A NaN buffer; the view [offset, offset + n) is the output, the rest must stay NaN."""
    return torch.full((offset + n + guard,), math.nan, dtype=dtype)


def values(dtype: torch.dtype, count: int = 400) -> torch.Tensor:
    random = torch.randn(count, generator=torch.Generator().manual_seed(count), dtype=torch.float64)
    return torch.cat([torch.tensor(SPECIAL, dtype=torch.float64),
                      torch.linspace(-30, 30, 241, dtype=torch.float64), random * 6]).to(dtype)


# -- activations ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_activation_kernels_match_float64_reference(lib, name, dtype):
    x = values(dtype)
    params = param_list(name)
    grad = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).to(dtype)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    code, act = DTYPE_CODES[dtype], NAMES.index(name)
    assert lib.emu_act_forward(act, code, ptr(x), ptr(y), x.numel(), doubles(params)) == 0
    assert lib.emu_act_backward(act, code, ptr(grad), ptr(x), ptr(dx), x.numel(),
                                doubles(params)) == 0
    assert_close(y, expected(name, x, params), dtype)
    assert_close(dx, expected(name, x, params, grad), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_prefix_suffix_and_misaligned_pointers(lib, dtype):
    # x and y at the same offset from a 16-byte boundary: scalar prefix, packs, scalar suffix;
    # at different offsets: the unrolled scalar path; in place: one pointer. Every element of the
    # output is written, nothing around it.
    pack = 16 // torch.empty((), dtype=dtype).element_size()
    base = values(dtype, 1200)
    code = DTYPE_CODES[dtype]
    for n in (1, pack - 1, pack, pack + 1, 2 * pack + 3, 1000):
        for x_offset, y_offset in ((0, 0), (1, 1), (pack - 1, pack - 1), (1, 0), (0, 3)):
            x = base[x_offset:x_offset + n]
            out = poisoned(n, dtype, y_offset)
            y = out[y_offset:y_offset + n]
            assert lib.emu_act_forward(NAMES.index("gelu"), code, ptr(x), ptr(y), n,
                                       doubles([])) == 0
            assert_close(y, expected("gelu", x, []), dtype)
            assert out[:y_offset].isnan().all() and out[y_offset + n:].isnan().all()
        inplace = base.clone()[1:n + 1]
        want = expected("silu", inplace, [])
        assert lib.emu_act_forward(NAMES.index("silu"), code, ptr(inplace), ptr(inplace), n,
                                   doubles([])) == 0
        assert_close(inplace, want, dtype)


@pytest.mark.parametrize("aligned", [True, False])
def test_grid_stride_loops_cover_tensors_larger_than_the_grid(lib, aligned, monkeypatch):
    # one emulated multiprocessor: 16 blocks x 256 threads x 8 floats per pass, so 100_003
    # elements take several passes of the grid-stride loop
    monkeypatch.setenv("MISHKIT_EMULATED_SMS", "1")
    n = 100_003
    x = torch.randn(n + 1, generator=torch.Generator().manual_seed(3))[int(not aligned):][:n]
    grad = torch.randn(n + 1, generator=torch.Generator().manual_seed(4))[1:]
    dx = poisoned(n, torch.float32)[:n]
    assert lib.emu_act_backward(NAMES.index("mish"), 0, ptr(grad), ptr(x), ptr(dx), n,
                                doubles([])) == 0
    assert_close(dx, expected("mish", x, [], grad), torch.float32)


def test_activation_launches_fit_the_gpu_limits(lib, monkeypatch):
    # configurations only (nothing runs): more than 2^31 elements, 132 multiprocessors
    monkeypatch.setenv("MISHKIT_EMULATION_DRY_RUN", "1")
    monkeypatch.setenv("MISHKIT_EMULATED_SMS", "132")
    for dtype, code in DTYPE_CODES.items():
        for n in (1, 2**31 + 7, 3 * 2**32):
            assert lib.emu_act_forward(0, code, None, None, n, doubles([])) == 0, (dtype, n)
            assert lib.emu_act_backward(0, code, None, None, None, n, doubles([])) == 0


# -- fused BatchNorm + activation -------------------------------------------------------------

# (shape, layout): NCHW with S a multiple of every pack, with S = 5 x 5, S = 1, 5-D; channels-last
# with C a multiple of every pack, C = 6, 5-D; an empty batch
BN_CASES = [((3, 5, 4, 8), "nchw"), ((9, 3, 5, 5), "nchw"), ((4, 6, 1, 1), "nchw"),
            ((2, 6, 2, 3, 4), "nchw"), ((3, 16, 4, 7), "channels_last"),
            ((2, 6, 5, 5), "channels_last"), ((2, 8, 2, 3, 4), "channels_last"),
            ((0, 3, 2, 2), "nchw")]
BN_TOLERANCE = {torch.float64: {}, torch.float32: {"rtol": 1e-5, "atol": 1e-5},
                torch.float16: {"rtol": 2e-3, "atol": 2e-3},
                torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def bn_input(shape, layout, dtype, misaligned=False, offset=1.0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)),
                    dtype=torch.float64) * 2 + offset
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    x = x.to(dtype)
    if misaligned:  # the same layout one element past a 16-byte boundary: the scalar loops
        storage = torch.empty(x.numel() + 1, dtype=dtype)[1:]
        x = storage.as_strided(x.shape, x.stride()).copy_(x)
    return x


def geometry(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.shape[0], x.shape[1], math.prod(x.shape[2:]), int(not x.is_contiguous())


def workspace(lib, x) -> torch.Tensor:
    size = I64()
    assert lib.emu_bn_workspace_bytes(DTYPE_CODES[x.dtype], *geometry(x), ctypes.byref(size)) == 0
    return torch.full((max(size.value // 8, 1),), math.nan, dtype=torch.float64)


def run_bn(lib, x, grad, mean, scale, shift, name, params):
    """(mean, var), y, (sum_dz, sum_dz_xmu), grad_x from the emulated kernels."""
    code, geo, act, p = DTYPE_CODES[x.dtype], geometry(x), NAMES.index(name), doubles(params)
    vector = torch.empty_like(mean)
    stats = (vector.clone(), vector.clone())
    y, grad_x = torch.full_like(x, math.nan), torch.full_like(x, math.nan)
    sums = (vector.clone(), vector.clone())
    work = workspace(lib, x)
    assert lib.emu_bn_stats(ptr(x), code, *geo, ptr(stats[0]), ptr(stats[1]), ptr(work)) == 0
    assert lib.emu_bn_forward(ptr(x), code, *geo, ptr(mean), ptr(scale), ptr(shift), ptr(y), act,
                              p) == 0
    assert lib.emu_bn_backward_reduce(ptr(grad), ptr(x), code, *geo, ptr(mean), ptr(scale),
                                      ptr(shift), ptr(sums[0]), ptr(sums[1]), ptr(work), act,
                                      p) == 0
    assert lib.emu_bn_backward_elemt(ptr(grad), ptr(x), code, *geo, ptr(mean), ptr(scale),
                                     ptr(shift), ptr(scale), ptr(shift), ptr(grad_x), act, p) == 0
    return stats, y, sums, grad_x


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom")  # the empty batch's nan
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize(("shape", "layout"), BN_CASES, ids=[f"{s}-{l}" for s, l in BN_CASES])
def test_bn_kernels_match_the_torch_backend(lib, shape, layout, misaligned, dtype):
    x = bn_input(shape, layout, dtype, misaligned)
    grad = bn_input(shape, layout, dtype, misaligned, offset=0.0)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    mean = torch.linspace(-0.5, 0.5, channels, dtype=compute)
    scale = torch.linspace(0.5, 1.5, channels, dtype=compute)
    shift = torch.linspace(0.3, -0.3, channels, dtype=compute)
    params = ["softplus", [2.0, 3.0]]
    stats, y, sums, grad_x = run_bn(lib, x, grad, mean, scale, shift, *params)
    tol = BN_TOLERANCE[dtype]
    ref = torch_backend
    torch.testing.assert_close(stats, ref.bn_act_stats(x), equal_nan=True,
                               **({} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}))
    torch.testing.assert_close(y, ref.bn_act_forward(x, mean, scale, shift, *params), **tol)
    torch.testing.assert_close(sums, ref.bn_act_backward_reduce(grad, x, mean, scale, shift,
                                                                *params),
                               **({} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}))
    torch.testing.assert_close(grad_x, ref.bn_act_backward_elemt(grad, x, mean, scale, shift, scale,
                                                                 shift, *params), **tol)
    assert y.stride() == x.stride() or x.numel() == 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_statistics_are_stable_and_deterministic(lib, layout):
    # 1e4 + N(0, sigma^2) in float32: a plain sum of squares would cancel to noise
    x = bn_input((8, 4, 12, 12), layout, torch.float64)
    x = ((x - 1) * torch.tensor([1.0, 0.1, 3.0, 0.01], dtype=torch.float64).view(1, 4, 1, 1)
         + 1e4).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        mean, var = torch.empty(4), torch.empty(4)
        assert lib.emu_bn_stats(ptr(x), 0, *geometry(x), ptr(mean), ptr(var),
                                ptr(workspace(lib, x))) == 0
        runs.append((mean, var))
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(runs[0][0].double(), want_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(runs[0][1].double(), want_var, rtol=1e-3, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # no atomics: bitwise repeatable


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_launches_fit_the_gpu_limits(lib, layout, monkeypatch):
    # configurations only: 10^5 channels, more than 2^32 elements, 132 multiprocessors
    monkeypatch.setenv("MISHKIT_EMULATION_DRY_RUN", "1")
    monkeypatch.setenv("MISHKIT_EMULATED_SMS", "132")
    cl = int(layout == "channels_last")
    p = doubles([])
    for n, c, s in ((1, 100_000, 1), (4096, 64, 2**20 + 3), (2, 3, 2**31 + 1), (1, 1, 1)):
        for code in DTYPE_CODES.values():
            size = I64()
            assert lib.emu_bn_workspace_bytes(code, n, c, s, cl, ctypes.byref(size)) == 0
            assert size.value >= 3 * c * 8
            args = (code, n, c, s, cl)
            assert lib.emu_bn_stats(None, *args, None, None, None) == 0, args
            assert lib.emu_bn_forward(None, *args, None, None, None, None, 0, p) == 0, args
            assert lib.emu_bn_backward_reduce(None, None, *args, None, None, None, None, None,
                                              None, 0, p) == 0, args
            assert lib.emu_bn_backward_elemt(None, None, *args, None, None, None, None, None,
                                             None, 0, p) == 0, args


def test_emulation_refuses_what_a_gpu_refuses(lib, monkeypatch):
    # the emulated launch checks configurations like the driver: a zero multiprocessor count
    # gives an invalid grid, which must come back as an error, not as silence
    monkeypatch.setenv("MISHKIT_EMULATED_SMS", "0")
    x = torch.randn(64)
    assert lib.emu_act_forward(0, 0, ptr(x), ptr(x), 64, doubles([])) != 0


OUTPUT_CASES = [((3, 5, 4, 7), "nchw", "mish", []), ((3, 16, 4, 7), "channels_last", "gelu", []),
                ((2, 6, 2, 3, 4), "channels_last", "elu", [0.7]),
                ((4, 6, 1, 1), "nchw", "silu", [])]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "layout", "name", "params"), OUTPUT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in OUTPUT_CASES])
def test_output_saving_bn_kernels_match_the_torch_backend(lib, shape, layout, name, params,
                                                          dtype, residual):
    """saves="output": the forward's y and bit mask, and the backward that recovers z from them
    (the inverse table read in the kernels), against mishkit.backends.reference_output."""
    x = bn_input(shape, layout, dtype)
    grad = bn_input(shape, layout, dtype, offset=0.0)
    r = bn_input(shape, layout, dtype, offset=-0.5) * 0.5 if residual else None
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    mean = torch.linspace(-0.5, 0.5, channels, dtype=compute)
    scale = torch.linspace(0.5, 1.5, channels, dtype=compute) * torch.tensor([1.0, -1.0]).repeat(
        channels)[:channels].to(compute)  # negative gammas flip the branch of x - mean
    shift = torch.linspace(0.3, -0.3, channels, dtype=compute)
    coef_xmu, coef_const = shift * 0.1, mean * 0.2
    code, geo, act, p = DTYPE_CODES[dtype], geometry(x), NAMES.index(name), doubles(params)
    branch = inversion.branch_point(name, tuple(params))
    table = inversion.inverse_table(name, dtype, x.device)
    floor, log_floor = inversion.saturation_floors(name, tuple(params), dtype)
    y = torch.full_like(x, math.nan)
    mask = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    assert lib.emu_bn_output_forward(ptr(x), ptr(r), code, *geo, ptr(mean), ptr(scale),
                                     ptr(shift), branch, ptr(y), ptr(mask), act, p) == 0
    ref = reference_output
    y_ref, mask_ref = ref.bn_act_output_forward(x, mean, scale, shift, r, branch, name, params)
    torch.testing.assert_close(y, y_ref, **BN_TOLERANCE[dtype])
    if dtype == torch.float64:  # elsewhere a z next to the branch point may round either way
        assert torch.equal(mask, mask_ref)
    inv_scale = scale.reciprocal()
    sums = (torch.empty_like(mean), torch.empty_like(mean))
    work = torch.zeros(2 * channels, dtype=torch.float64)
    table_ptr = ptr(table) if table.numel() else None
    assert lib.emu_bn_output_backward_reduce(
        ptr(grad), ptr(y_ref), ptr(mask_ref), ptr(r), code, *geo, ptr(inv_scale), ptr(shift),
        table_ptr, floor, log_floor, ptr(sums[0]), ptr(sums[1]), ptr(work), act, p) == 0
    want = ref.bn_act_output_backward_reduce(grad, y_ref, mask_ref, scale, shift, r, table, name,
                                             params)
    loose = {} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-2}
    torch.testing.assert_close(sums, want[:2], **loose)
    grad_x = torch.full_like(x, math.nan)
    grad_r = torch.full_like(x, math.nan) if residual else None
    assert lib.emu_bn_output_backward_elemt(
        ptr(grad), ptr(y_ref), ptr(mask_ref), ptr(r), code, *geo, ptr(scale), ptr(inv_scale),
        ptr(shift), ptr(coef_xmu), ptr(coef_const), table_ptr, floor, log_floor, ptr(grad_x),
        ptr(grad_r), act, p) == 0
    want_x, want_r = ref.bn_act_output_backward_elemt(grad, y_ref, mask_ref, scale.new_empty(0),
                                                      scale, shift, r, coef_xmu, coef_const,
                                                      table, name, params)
    tol = BN_TOLERANCE[dtype] if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(grad_x, want_x, **tol)
    if residual:
        torch.testing.assert_close(grad_r, want_r, **tol)
