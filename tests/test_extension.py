"""The compiled extension mishkit._C at the op level: its module functions, the CPU instruction-set
dispatch (every build checked against the float64 registry formulas at extreme values), argument
validation, memory layouts and the elementwise loop's vector body / scalar tail / thread split.
The CUDA half is at the end (marked gpu)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mishkit
from mishkit import backends
from mishkit.registry import ACTIVATIONS

from .helpers import (
    CPU_BUILD_REQUIREMENTS,
    DTYPES,
    SPECIAL,
    SUPPORTED_CPU_BUILDS,
    assert_close,
    cpu_build_params,
    param_list,
)
from .helpers import kernel_expected as expected

_C, _REASON = backends.extension_module()
# Skip only where nothing was built; a built .so that fails to load is a failure, not a skip.
_BUILT = any(Path(mishkit.__file__).parent.glob("_C*.so")) and \
    os.environ.get("MISHKIT_DISABLE_EXT") != "1"
if _C is None and _BUILT:
    raise ImportError(f"mishkit._C is built but does not load: {_REASON}")
pytestmark = pytest.mark.skipif(_C is None, reason=f"extension not built: {_REASON}")

ops = torch.ops.mishkit
NAMES = list(ACTIVATIONS)


CAPABILITIES = cpu_build_params()


def grid(dtype, n_random=300):
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64),
                        torch.linspace(-30, 30, 601, dtype=torch.float64),
                        torch.randn(n_random, generator=gen, dtype=torch.float64) * 8])
    return values.to(dtype)


# -- module functions ------------------------------------------------------------------------------


def test_kernel_names_are_exactly_the_registry():
    assert _C.kernel_names() == list(ACTIVATIONS)


def test_version_matches_the_package():
    assert _C.version() == mishkit.__version__


def test_with_cuda_matches_the_registered_kernels():
    assert isinstance(_C.with_cuda(), bool)
    for op in ("act_forward", "act_forward_", "act_backward"):
        qualname = f"mishkit::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
        assert has_cuda == _C.with_cuda()
    if torch.version.cuda is None:  # a CPU-only torch cannot have been built against CUDA
        assert not _C.with_cuda()


def test_cpu_capability_picks_the_best_build_the_cpu_supports():
    if os.environ.get("MISHKIT_CPU_CAPABILITY"):
        pytest.skip("MISHKIT_CPU_CAPABILITY overrides the automatic choice in this environment")
    assert _C.cpu_capability() == SUPPORTED_CPU_BUILDS[-1]


@pytest.mark.parametrize("forced", CAPABILITIES)
def test_cpu_capability_environment_override(forced):
    code = "from mishkit import _C; print(_C.cpu_capability())"
    env = {**os.environ, "MISHKIT_CPU_CAPABILITY": forced}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == forced


def test_set_cpu_capability_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown cpu capability 'sse9'; choose one of "
                                         "'default', 'avx2', 'avx512'"):
        _C.set_cpu_capability("sse9")


@pytest.mark.parametrize("missing", [name for name in CPU_BUILD_REQUIREMENTS
                                     if name not in SUPPORTED_CPU_BUILDS])
def test_set_cpu_capability_refuses_what_the_cpu_lacks(missing):
    previous = _C.cpu_capability()
    with pytest.raises(RuntimeError, match=f"'{missing}' requested, but this CPU lacks"):
        _C.set_cpu_capability(missing)
    assert _C.cpu_capability() == previous


def test_set_cpu_capability_switches_the_reported_build():
    previous = _C.cpu_capability()
    try:
        for name in SUPPORTED_CPU_BUILDS:
            _C.set_cpu_capability(name)
            assert _C.cpu_capability() == name
    finally:
        _C.set_cpu_capability(previous)


# -- numerics of every CPU build -------------------------------------------------------------------


@pytest.mark.parametrize("cpu_build", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference_at_extremes(name, dtype, cpu_build):
    x = grid(dtype)
    params = param_list(name)
    grad = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).to(dtype)
    assert_close(ops.act_forward(x, name, params), expected(name, x, params))
    assert_close(ops.act_backward(grad, x, name, params), expected(name, x, params, grad))
    inplace = x.clone()
    assert ops.act_forward_(inplace, name, params) is inplace
    assert_close(inplace, expected(name, x, params))


@pytest.mark.skipif(len(SUPPORTED_CPU_BUILDS) < 2, reason="this CPU has no AVX2: one build only")
@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES),
       values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                       max_size=70))
def test_vector_builds_agree_with_the_baseline(name, values):
    x = torch.tensor(values, dtype=torch.float32)
    params = param_list(name)
    previous = _C.cpu_capability()
    results = {}
    try:
        for capability in SUPPORTED_CPU_BUILDS:
            _C.set_cpu_capability(capability)
            results[capability] = (ops.act_forward(x, name, params),
                                   ops.act_backward(torch.ones_like(x), x, name, params))
    finally:
        _C.set_cpu_capability(previous)
    for capability, got in results.items():
        torch.testing.assert_close(got, results["default"], rtol=2e-6, atol=1e-7, equal_nan=True,
                                   msg=lambda m, c=capability: f"{c} vs default: {m}")


@pytest.mark.parametrize("cpu_build", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 65, 100_003])
def test_vector_body_scalar_tail_and_thread_split(size, dtype, cpu_build):
    # Vectors hold 4 to 32 elements depending on build and dtype; 100_003 elements exceed the
    # parallel grain (32768): several threads, uneven chunks
    x = (torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
         * 6).to(dtype)
    for name in ("mish", "gelu", "softplus"):
        params = param_list(name)
        assert_close(ops.act_forward(x, name, params), expected(name, x, params))
        assert_close(ops.act_backward(x, x, name, params), expected(name, x, params, x))


def test_thread_count_does_not_change_results():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.act_backward(x, x, "mish", [])
        torch.set_num_threads(2)
        multi = ops.act_backward(x, x, "mish", [])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


# -- layouts ---------------------------------------------------------------------------------------


def test_channels_last_output_keeps_the_layout():
    x = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last)
    y = ops.act_forward(x, "mish", [])
    assert y.stride() == x.stride()
    assert_close(y, expected("mish", x, []))
    grad = torch.randn(2, 5, 3, 4)  # contiguous: a different layout from x
    dx = ops.act_backward(grad, x, "mish", [])
    assert dx.stride() == x.stride()
    assert_close(dx, expected("mish", x, [], grad))


@pytest.mark.parametrize("view", ["transposed", "strided", "offset", "expanded"])
def test_non_contiguous_inputs(view):
    base = torch.randn(6, 10, dtype=torch.float64)
    x = {"transposed": base.t(), "strided": base[:, ::3], "offset": base[1:, 2:],
         "expanded": base[:1].expand(4, 10)}[view]
    grad = torch.randn(x.shape, dtype=torch.float64).t().contiguous().t()
    assert_close(ops.act_forward(x, "silu", []), expected("silu", x, []))
    assert_close(ops.act_backward(grad, x, "silu", []), expected("silu", x, [], grad))


def test_inplace_on_a_view_writes_through_and_rejects_overlap():
    base = torch.randn(4, 6)
    original = base.clone()
    ops.act_forward_(base[:, 1::2], "relu", [])
    assert torch.equal(base[:, 1::2], original[:, 1::2].clamp_min(0))
    assert torch.equal(base[:, ::2], original[:, ::2])
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.act_forward_(torch.randn(1, 3).expand(2, 3), "relu", [])


def test_empty_and_zero_dim_tensors():
    assert ops.act_forward(torch.empty(0, 3), "mish", []).shape == (0, 3)
    scalar = torch.tensor(-1.5, dtype=torch.float64)
    assert_close(ops.act_forward(scalar, "elu", [1.0]), expected("elu", scalar, [1.0]))


# -- argument validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64], ids=str)
def test_non_float_dtypes_are_type_errors(dtype):
    x = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=r"act_forward\(mish\): unsupported dtype"):
        ops.act_forward(x, "mish", [])
    with pytest.raises(TypeError, match=r"act_backward\(gelu\): unsupported dtype"):
        ops.act_backward(x, x, "gelu", [])


def test_unknown_activation_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*mish, silu, gelu"):
        ops.act_forward(torch.zeros(2), "swish", [])  # aliases resolve in Python, not here


@pytest.mark.parametrize(("name", "params", "message"), [
    ("mish", [1.0], r"expected 0 parameter\(s\), got 1"),
    ("softplus", [1.0], r"expected 2 parameter\(s\) \[beta, threshold\], got 1"),
    ("leaky_relu", [], r"expected 1 parameter\(s\) \[negative_slope\], got 0"),
    ("elu", [math.nan], "must be finite"),
    ("elu", [math.inf], r"parameter 0 \(alpha\) must be finite, got inf"),
    ("softplus", [math.inf, 20.0], r"parameter 0 \(beta\) must be finite, got inf"),
    ("softplus", [1.0, math.nan], r"parameter 1 \(threshold\) must be finite or \+-inf"),
])
def test_bad_parameter_lists(name, params, message):
    with pytest.raises(ValueError, match=message):
        ops.act_forward(torch.zeros(2), name, params)


@pytest.mark.parametrize("threshold", [math.inf, -math.inf])
def test_softplus_threshold_may_be_infinite(threshold):
    x = torch.linspace(-20, 95, 47, dtype=torch.float64)
    got = ops.act_forward(x.float(), "softplus", [1.0, threshold])
    assert_close(got, torch.nn.functional.softplus(x, 1.0, threshold), torch.float32)
    got = ops.act_backward(torch.ones(47), x.float(), "softplus", [1.0, threshold])
    want = torch.sigmoid(x) if threshold > 0 else torch.ones_like(x)
    assert_close(got, want, torch.float32)


def test_inplace_op_declares_its_mutation_and_bumps_the_version():
    # the schema's (a!) plus the ADInplaceOrView kernel: exactly one bump per call, like relu_
    x = torch.randn(8)
    before = x._version
    ops.act_forward_(x, "relu", [])
    assert x._version == before + 1
    schema = ops.act_forward_.default._schema
    assert schema.arguments[0].alias_info.is_write and schema.is_mutable
    for key in ("Autograd", "ADInplaceOrView"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("mishkit::act_forward_", key)


def test_bn_kernels_accept_channels_last_3d_and_size_one_strides():
    x = torch.randn(2, 3, 2, 4, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last_3d)
    mean, var = ops.bn_act_stats(x)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3, 4), correction=0))
    vec = torch.ones(3, dtype=torch.float64)
    y = ops.bn_act_forward(x, mean, vec, vec * 0, "relu", [])
    assert y.stride() == x.stride()
    with pytest.raises(ValueError, match=r"contiguous, channels_last \(4-D\) or channels_last_3d"):
        ops.bn_act_forward(x.transpose(2, 3), mean, vec, vec, "relu", [])


def test_backward_shape_and_dtype_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"grad_out has shape \[3, 2\] but x has shape \[2, 3\]"):
        ops.act_backward(torch.zeros(3, 2), x, "mish", [])
    with pytest.raises(TypeError, match="grad_out has dtype Double but x has dtype Float"):
        ops.act_backward(torch.zeros(2, 3, dtype=torch.float64), x, "mish", [])


# -- CUDA ------------------------------------------------------------------------------------------


def _require_cuda_kernels():
    if not _C.with_cuda():
        pytest.fail("GPU test on a GPU machine, but mishkit._C was built without CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernels_match_the_cpu_kernels(name, dtype):
    _require_cuda_kernels()
    x = grid(dtype, n_random=4000)
    params = param_list(name)
    grad = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).to(dtype)
    assert_close(ops.act_forward(x.cuda(), name, params).cpu(), expected(name, x, params))
    got = ops.act_backward(grad.cuda(), x.cuda(), name, params).cpu()
    assert_close(got, expected(name, x, params, grad))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_layouts_alignment_and_inplace(dtype):
    _require_cuda_kernels()
    x = torch.randn(3, 6, 5, 7, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    y = ops.act_forward(x, "mish", [])
    assert y.stride() == x.stride()
    assert_close(y.cpu(), expected("mish", x.cpu(), []))
    grad = torch.randn(x.shape, device="cuda").to(dtype)  # contiguous: brought to x's layout
    assert_close(ops.act_backward(grad, x, "mish", []).cpu(), expected("mish", x.cpu(), [], grad))
    flat = torch.randn(1000, device="cuda").to(dtype)
    for offset in (1, 3):  # misaligned start: the scalar path
        view = flat[offset:]
        assert_close(ops.act_forward(view, "gelu", []).cpu(), expected("gelu", view.cpu(), []))
    strided = flat.clone()[::3]  # not dense: copied, computed, written back
    want = expected("silu", strided.cpu(), [])
    ops.act_forward_(strided, "silu", [])
    assert_close(strided.cpu(), want)


@pytest.mark.gpu
def test_cuda_device_mismatch_names_both_devices():
    _require_cuda_kernels()
    with pytest.raises(RuntimeError, match="grad_out is on cuda:0 but x is on cpu"):
        ops.act_backward(torch.ones(4, device="cuda"), torch.ones(4), "mish", [])
