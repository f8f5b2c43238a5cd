"""The CPU kernels' instruction-set builds: the inlined float exp / expm1 / log1p, GELU's normal
cdf and density and serf's erf(softplus) fits in the AVX2 and AVX-512 builds at ulp level
(tighter than the numerics contract, which test_extension.py checks at the extremes), the
MISHKIT_CPU_CAPABILITY override in any case, and what `mishkit info` says about the build it runs
and why."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mishkit import backends, info
from mishkit.registry import ACTIVATIONS

from .helpers import SPECIAL, SUPPORTED_CPU_BUILDS, cpu_build_params, kernel_expected, param_list

_C, _REASON = backends.extension_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"extension not built: {_REASON}")
ops = torch.ops.mishkit

_, FLAGS = info.cpu_model_and_flags()
VECTOR_BUILDS = cpu_build_params(("avx2", "avx512"))
# 4 float32 ulp: the inlined functions measure <= 1.5 ulp each, and one activation adds a few
# roundings around them
ULP4 = 4 * 2.0**-23


def dense_grid(lo: float, hi: float) -> torch.Tensor:
    """Every 2^-k magnitude and a dense linear sweep over [lo, hi], as float32."""
    powers = 2.0 ** torch.arange(-149, 128, dtype=torch.float64)
    values = torch.cat([powers, -powers, torch.linspace(lo, hi, 400_003, dtype=torch.float64)])
    return values[(values >= lo) & (values <= hi)].float()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
def test_inlined_expm1_and_exp_through_elu(cpu_build):
    # elu(x) = expm1(x) and elu'(x) = exp(x) for x <= 0 (alpha = 1): every exponent down to the
    # saturation at -1 and the subnormal range of exp
    x = dense_grid(-110.0, 0.0)
    assert_within(ops.act_forward(x, "elu", [1.0]), torch.expm1(x.double()), ULP4, 1e-45)
    grad = ops.act_backward(torch.ones_like(x), x, "elu", [1.0])
    assert_within(grad, torch.exp(x.double()), ULP4, 2e-38)  # below 2^-126 exp is subnormal


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
def test_inlined_log1p_through_softplus(cpu_build):
    # softplus(x) = log1p(exp(x)) below the threshold: log1p of every magnitude in (0, e^88)
    x = dense_grid(-100.0, 88.0)
    got = ops.act_forward(x, "softplus", [1.0, 1000.0])
    assert_within(got, torch.log1p(torch.exp(x.double())), ULP4, 1e-43)


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
def test_gelu_keeps_relative_precision_down_to_the_underflow_of_phi(cpu_build):
    # x Phi(x) and Phi(x) + x phi(x) from one exponential: relative accuracy for x << 0 too,
    # where 0.5 (1 + erf) cancels; Phi underflows float near x = -13
    x = dense_grid(-13.0, 30.0)
    xd = x.double()
    cdf = 0.5 * torch.special.erfc(-xd / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * xd * xd) / math.sqrt(2.0 * math.pi)
    assert_within(ops.act_forward(x, "gelu", []), xd * cdf, 1e-6, 1e-40)
    # the derivative crosses 0 at x = -0.75: there its error is absolute, a few ulp of 1
    grad = ops.act_backward(torch.ones_like(x), x, "gelu", [])
    assert_within(grad, cdf + xd * pdf, 1e-6, 3e-7)


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
def test_serf_fits_keep_relative_precision_on_both_sides_of_zero(cpu_build):
    # erf(softplus(x)) and its derivative from polynomial fits in e^x (x < 0) and in x with
    # e^(-x^2) (x >= 0): relative accuracy down to results near 1e-35, 1 at the fits' ends
    x = dense_grid(-80.0, 30.0)
    xd = x.double()
    sp = torch.nn.functional.softplus(xd)
    s = torch.erf(sp)
    x_ds = xd * (2 / math.sqrt(math.pi)) * torch.exp(-sp * sp) * torch.sigmoid(xd)
    assert_within(ops.act_forward(x, "serf", []), xd * s, 5 * 2.0**-23, 1e-38)
    # f' = s + x ds/dx cancels near its root (x = -1.19): the error is relative to the terms
    grad = ops.act_backward(torch.ones_like(x), x, "serf", []).double()
    error = (grad - (s + x_ds)).abs() / (s.abs() + x_ds.abs())
    assert error.max() < 4e-7, x[error.argmax()].item()


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """A half type's bit patterns as integers in the order of the values (+0 and -0 both 0), so
    that a difference is a distance in ulp."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_half_types_are_the_float_result_rounded_on_all_inputs(name, dtype, cpu_build):
    # every finite bit pattern: the half-type loops (bfloat16 with the shorter kBFloat16 float
    # math) within one ulp of the float kernel's result rounded to dtype, forward and backward
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    params = param_list(name)
    ones = torch.ones_like(x)
    pairs = [(ops.act_forward(x, name, params), ops.act_forward(x.float(), name, params)),
             (ops.act_backward(ones, x, name, params),
              ops.act_backward(ones.float(), x.float(), name, params))]
    for got, from_float in pairs:
        expected = from_float.to(dtype)
        assert torch.equal(got.isnan(), expected.isnan()), name
        distance = (ordered_bits(got) - ordered_bits(expected)).abs()[~got.isnan()]
        assert distance.max() <= 1, (name, x[~got.isnan()][distance.argmax()].item())


@pytest.mark.parametrize("cpu_build", VECTOR_BUILDS, indirect=True)
def test_inlined_functions_keep_the_ieee_special_values(cpu_build):
    x = torch.tensor([float("-inf"), float("inf"), float("nan"), 89.0, 88.7, -104.0, -0.0, 0.0])
    elu = ops.act_forward(x, "elu", [1.0])  # expm1 where x <= 0, x itself above
    torch.testing.assert_close(elu[:3], torch.tensor([-1.0, float("inf"), float("nan")]),
                               equal_nan=True)
    selu_grad = ops.act_backward(torch.ones_like(x), x, "selu", [])  # exp(x) for x <= 0
    assert selu_grad[0] == 0 and torch.isnan(selu_grad[2])
    # max(x, 0) + log1p(exp(-|x|)) with no threshold: no overflow where exp(x) would overflow
    softplus = ops.act_forward(x, "softplus", [1.0, float("inf")])
    assert softplus[0] == 0 and softplus[1] == float("inf") and torch.isnan(softplus[2])
    assert softplus[3] == 89.0 and softplus[4] == torch.tensor(88.7)  # e^-88.7 below half an ulp
    tanhexp = ops.act_forward(x, "tanhexp", [])  # expm1(-2 e^x)
    assert tanhexp[0] == 0 and tanhexp[1] == float("inf") and torch.isnan(tanhexp[2])


PIECEWISE_LINEAR = ["relu", "leaky_relu", "hardswish", "hardmish"]


@pytest.mark.skipif("avx512" not in SUPPORTED_CPU_BUILDS, reason="this CPU lacks AVX-512")
@pytest.mark.parametrize("name", PIECEWISE_LINEAR)
def test_piecewise_linear_float_loops_at_either_width(name):
    # the AVX-512 build runs these float loops at 256 or 512 bits by CPU vendor: both widths,
    # whichever this CPU defaults to, against float64, over vector bodies, tails and a thread split
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(SPECIAL), torch.linspace(-8, 8, 1601),
                   torch.randn(100_003, generator=gen) * 6]).float()
    grad = torch.randn(x.numel(), generator=gen)
    params = param_list(name)
    previous = _C.cpu_capability(), _C.linear_float_loops_256bit()
    results = {}
    try:
        _C.set_cpu_capability("avx512")
        for width_256 in (True, False):
            _C.set_linear_float_loops_256bit(width_256)
            assert _C.linear_float_loops_256bit() is width_256
            inplace = x[:1623].clone()
            ops.act_forward_(inplace, name, params)
            results[width_256] = (ops.act_forward(x, name, params),
                                  ops.act_backward(grad, x, name, params), inplace)
    finally:
        _C.set_cpu_capability(previous[0])
        _C.set_linear_float_loops_256bit(previous[1])
    for forward, backward, inplace in results.values():
        torch.testing.assert_close(forward, kernel_expected(name, x, params), equal_nan=True)
        torch.testing.assert_close(backward, kernel_expected(name, x, params, grad),
                                   equal_nan=True)
        torch.testing.assert_close(inplace, forward[:1623], equal_nan=True, rtol=0, atol=0)


def cpu_vendor() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return None


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_linear_loop_width_follows_the_cpu_vendor_and_info_says_it():
    result = run_python(INFO_JSON)
    assert result.returncode == 0, result.stderr
    ext = json.loads(result.stdout)
    amd = cpu_vendor() == "AuthenticAMD"
    code = "from mishkit import _C; print(_C.linear_float_loops_256bit())"
    assert run_python(code).stdout.strip() == str(amd)
    if ext["cpu_capability"] != "avx512":
        assert ext["linear_float_loops"] is None
    else:
        assert ext["linear_float_loops"].startswith("256-bit" if amd else "512-bit")


# -- choosing the build ----------------------------------------------------------------------------


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    if "MISHKIT_CPU_CAPABILITY" not in env:
        full_env.pop("MISHKIT_CPU_CAPABILITY", None)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("spelling", ["AVX2", "Avx512", "DEFAULT", "avx2"])
def test_environment_override_accepts_any_case(spelling):
    if spelling.lower() not in SUPPORTED_CPU_BUILDS:
        pytest.skip(f"this CPU cannot run the {spelling.lower()} build")
    result = run_python("from mishkit import _C; print(_C.cpu_capability())",
                        MISHKIT_CPU_CAPABILITY=spelling)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == spelling.lower()


def test_set_cpu_capability_accepts_any_case():
    previous = _C.cpu_capability()
    try:
        for name in SUPPORTED_CPU_BUILDS:
            _C.set_cpu_capability(name.upper())
            assert _C.cpu_capability() == name
    finally:
        _C.set_cpu_capability(previous)


def test_unknown_override_names_the_choices():
    result = run_python("from mishkit import _C; _C.cpu_capability()",
                        MISHKIT_CPU_CAPABILITY="AVX9")
    assert result.returncode != 0
    assert "unknown cpu capability 'AVX9'; choose one of 'default', 'avx2', 'avx512'" in \
        result.stderr


INFO_JSON = "import json, mishkit.info as i; print(json.dumps(i.collect()['extension']))"


@pytest.mark.skipif(FLAGS is None, reason="no /proc/cpuinfo flags on this system")
def test_info_predicts_the_automatic_choice_and_says_why():
    result = run_python(INFO_JSON)
    assert result.returncode == 0, result.stderr
    ext = json.loads(result.stdout)
    assert ext["cpu_capability"] == info.automatic_cpu_capability(FLAGS)
    assert ext["cpu_capability"] == SUPPORTED_CPU_BUILDS[-1]
    assert ext["cpu_capability_reason"].startswith("the widest build this CPU supports")
    for flag in info.CPU_BUILD_FLAGS[ext["cpu_capability"]]:
        assert flag in ext["cpu_capability_reason"]


def test_info_names_a_forced_build():
    result = run_python(INFO_JSON, MISHKIT_CPU_CAPABILITY="DEFAULT")
    assert result.returncode == 0, result.stderr
    ext = json.loads(result.stdout)
    assert ext["cpu_capability"] == "default"
    assert ext["cpu_capability_reason"] == "forced by MISHKIT_CPU_CAPABILITY=DEFAULT"


@pytest.mark.skipif(len(SUPPORTED_CPU_BUILDS) < 2, reason="this CPU runs one build only")
def test_info_names_a_run_time_switch():
    previous = _C.cpu_capability()
    try:
        _C.set_cpu_capability("default")
        ext = info.collect()["extension"]
    finally:
        _C.set_cpu_capability(previous)
    assert ext["cpu_capability"] == "default"
    if not os.environ.get("MISHKIT_CPU_CAPABILITY"):
        assert ext["cpu_capability_reason"].startswith("switched at run time")
        assert SUPPORTED_CPU_BUILDS[-1] in ext["cpu_capability_reason"]


def test_info_text_names_the_cpu_and_the_build():
    result = run_python("import mishkit.__main__ as m; m.main(['info'])")
    assert result.returncode == 0, result.stderr
    assert "CPU: " in result.stdout
    assert f"CPU build {_C.cpu_capability()}: " in result.stdout
