"""BatchNormAct2d(saves="output"): against float64 BatchNorm + activation, on every backend."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishkit import backends, convert
from mishkit.backends import inversion
from mishkit.backends import reference_output as torch_output
from mishkit.batchnorm import BatchNormAct2d, SyncBatchNormAct2d, batch_norm_act
from mishkit.registry import get_spec

from .helpers import saved_bytes

BACKENDS = backends.available_backends("cpu")
backend_param = pytest.mark.parametrize("backend", BACKENDS)
TABULATED = ["mish", "silu", "gelu", "gelu_tanh", "tanhexp", "serf", "smish", "logish"]
CLOSED_FORM = [("leaky_relu", {"negative_slope": 0.2}), ("leaky_relu", {"negative_slope": -0.5}),
               ("elu", {"alpha": 0.7}), ("selu", {}), ("softplus", {"beta": 2.0, "threshold": 5.0})]
INVERTIBLE = [(name, {}) for name in TABULATED] + CLOSED_FORM
FLAT = [("relu", {}), ("hardswish", {}), ("hardmish", {}), ("leaky_relu", {"negative_slope": 0.0}),
        ("elu", {"alpha": 0.0})]


def underflow_point(name: str, dtype: torch.dtype) -> float:
    """The z below which |f(z)| is under ``dtype``'s smallest normal (bisection in float64)."""
    f, _ = inversion.float64_forward(name)
    lo, hi = -1e3, inversion.branch_point(name, ())
    for _ in range(100):
        mid = (lo + hi) / 2
        small = abs(float(f(torch.tensor(mid, dtype=torch.float64)))) < torch.finfo(dtype).tiny
        lo, hi = (mid, hi) if small else (lo, mid)
    return hi


def z_ranges(name: str, dtype: torch.dtype) -> list[tuple[float, float]]:
    """z range per channel of the accuracy probe: the whole useful range, the minimum's
    neighbourhood, the very negative tail (down to where y underflows, at most -60) and the right
    branch."""
    # float32 compute: exp(-2 z) in gelu_tanh overflows shortly before its y underflows
    lo = max(-60.0, underflow_point(name, dtype), underflow_point(name, torch.float32) + 1.0)
    return [(max(lo, -20.0), 20.0), (-3.0, 1.0), (-1.35, -1.05), (lo, lo + 10.0), (0.0, 12.0)]


def _id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def reference_grads(x, weight, bias, grad, name, params, residual=None, training=True,
                    running=None):
    """y and (grad_x, grad_weight, grad_bias[, grad_residual]) of float64 BatchNorm2d + the
    registry's float64 activation, by autograd."""
    spec = get_spec(name)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        leaves.append(residual.detach().double().requires_grad_())
    mean, var = (None, None) if running is None else (r.double() for r in running)
    z = F.batch_norm(leaves[0], mean, var, leaves[1], leaves[2], training=training, eps=1e-5)
    if residual is not None:
        z = z + leaves[3]
    y = spec.reference(z, **spec.kwargs(spec.bind((), params)))
    return y, torch.autograd.grad(y, leaves, grad.double())


def fused_grads(x, weight, bias, grad, name, params, backend, residual=None, saves="output",
                training=True, running=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())
    spec = get_spec(name)
    mean, var = (None, None) if running is None else (r.clone() for r in running)
    y = batch_norm_act(leaves[0], mean, var, leaves[1], leaves[2], training, 0.1, 1e-5, name,
                       spec.bind((), params), backend, residual=leaves[3] if residual is not None
                       else None, saves=saves)
    return y, torch.autograd.grad(y, leaves, grad)


def _affine(channels, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
    weight[::2] *= -1  # negative gammas flip the branch of x - mean
    bias = torch.randn(channels, generator=generator, dtype=dtype) * 0.5
    return weight, bias


@backend_param
@pytest.mark.parametrize("case", INVERTIBLE, ids=_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual"])
def test_float64_matches_batchnorm_then_activation(backend, case, layout):
    name, params = case
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 7, dtype=torch.float64) * 2 + 0.3
    residual = None
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "residual":
        residual = torch.randn_like(x)
    weight, bias = _affine(5)
    grad = torch.randn_like(x)
    y, got = fused_grads(x, weight, bias, grad, name, params, backend, residual)
    y_ref, expected = reference_grads(x, weight, bias, grad, name, params, residual)
    assert y.grad_fn is not None and "Output" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for label, a, b in zip(("x", "weight", "bias", "residual"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad {label}")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@backend_param
def test_running_statistics_with_grad(backend):
    """Eval mode with autograd on: BN is a fixed affine map, still saved as the output."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    weight, bias = _affine(4)
    running = (torch.linspace(-1, 1, 4, dtype=torch.float64),
               torch.linspace(0.5, 2, 4, dtype=torch.float64))
    grad = torch.randn_like(x)
    _, got = fused_grads(x, weight, bias, grad, "silu", {}, backend, training=False,
                         running=running)
    _, expected = reference_grads(x, weight, bias, grad, "silu", {}, training=False,
                                  running=running)
    torch.testing.assert_close(got, tuple(e for e in expected), rtol=1e-9, atol=1e-9)


def _probe(ranges, dtype, n=2, h=24, w=32):
    """x, weight, bias with z = bn(x) spanning ranges[c] uniformly in channel c."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(n, len(ranges), h, w, generator=generator, dtype=torch.float64)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True, correction=0)
    lo = x_hat.amin((0, 2, 3))
    hi = x_hat.amax((0, 2, 3))
    bounds = torch.tensor(ranges, dtype=torch.float64)
    weight = (bounds[:, 1] - bounds[:, 0]) / (hi - lo)
    bias = bounds[:, 0] - weight * lo
    return x.to(dtype), weight.to(torch.float32), bias.to(torch.float32)


def gradient_errors(name, params, backend, dtype, ranges=None):
    """Per probe channel (:func:`z_ranges`): max |grad_x - ref| over the largest |ref| of the
    layer, and the errors of grad_weight and grad_bias over their largest reference value, for
    saves="output" against the float64 reference."""
    x, weight, bias = _probe(ranges or z_ranges(name, dtype), dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    _, got = fused_grads(x, weight, bias, grad, name, params, backend)
    _, ref = reference_grads(x, weight, bias, grad, name, params)
    grad_x = (got[0].double() - ref[0]).abs().amax((0, 2, 3)) / ref[0].abs().max()
    grad_w = (got[1].double() - ref[1]).abs() / ref[1].abs().max()
    grad_b = (got[2].double() - ref[2]).abs() / ref[2].abs().max()
    return grad_x, grad_w, grad_b


# Bounds on the probe's errors (README "Numerical notes" lists the measured values): float32 is
# limited by the rounding of y near the minimum (f' = 0 there), half types by y's 8 or 11 bits.
GRADIENT_BOUNDS = {torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@backend_param
@pytest.mark.parametrize("name", ["mish", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_error_across_the_input_range_is_bounded(backend, name, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the interpreter is slow; half inputs of the Triton kernels are covered on GPU")
    ranges = z_ranges(name, dtype)
    if backend in ("triton", "torch") and name == "gelu":
        # their gelu computes 1 + erf(z / sqrt 2), which cancels for z < -3 in float32: y itself
        # (of either saves mode) is inexact there, and so is any z recovered from it (the C++ and
        # CUDA kernels use erfc)
        ranges = [(max(lo, -3.5), max(hi, -2.5)) for lo, hi in ranges]
    grad_x, grad_w, grad_b = gradient_errors(name, {}, backend, dtype, ranges)
    bound = GRADIENT_BOUNDS[dtype]
    assert grad_x.max() < bound, grad_x
    assert grad_w.max() < bound and grad_b.max() < bound, (grad_w, grad_b)


def test_float32_is_no_worse_than_the_rounding_of_y_requires():
    """Away from the minimum the float32 gradient is as good as the input-saving one."""
    x, weight, bias = _probe(z_ranges("mish", torch.float32), torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    _, got = fused_grads(x, weight, bias, grad, "mish", {}, "torch")
    _, inputs = fused_grads(x, weight, bias, grad, "mish", {}, "torch", saves="input")
    _, ref = reference_grads(x, weight, bias, grad, "mish", {})
    right = 4  # the z in [0, 12] channel
    scale = ref[0][:, right].abs().max()
    err_output = (got[0][:, right].double() - ref[0][:, right]).abs().max() / scale
    err_input = (inputs[0][:, right].double() - ref[0][:, right]).abs().max() / scale
    assert err_output < max(4 * err_input, 1e-6)


@pytest.mark.parametrize("name", TABULATED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_recovers_z_on_both_branches(name, dtype):
    f, _ = inversion.float64_forward(name)
    z_star = inversion.branch_point(name, ())
    z = torch.cat([torch.linspace(-60, -20, 400, dtype=torch.float64),
                   torch.linspace(-20, 30, 20001, dtype=torch.float64),
                   torch.linspace(30, 1e4, 100, dtype=torch.float64)])
    y = f(z).to(dtype)
    left = z < z_star
    table = inversion.inverse_table(name, dtype, "cpu")
    got = inversion.invert(y, left, table, name, (), dtype).double()
    keep = (z - z_star).abs() > 0.05  # the minimum's ill-conditioning is tested below
    keep &= y.abs() >= torch.finfo(dtype).tiny  # normal y only: subnormals hold few bits
    error = ((got - z).abs() / z.abs().clamp(min=1))[keep]
    assert error.max() < (1e-12 if dtype == torch.float64 else 2e-6)
    # near the minimum z is known to sqrt(2 ulp(y*) / f''(z*)), a few 1e-4 in float32
    near = (z - z_star).abs() <= 0.05
    assert (got - z)[near].abs().max() < (1e-6 if dtype == torch.float64 else 2e-3)


def test_inverse_at_special_outputs():
    table = inversion.inverse_table("mish", torch.float32, "cpu")
    y = torch.tensor([math.nan, 0.0, -0.0, math.inf, -0.5, 3e38])
    left = torch.tensor([True, True, True, False, False, False])
    z = inversion.invert(y, left, table, "mish", (), torch.float32)
    assert math.isnan(z[0]) and z[3] == math.inf
    assert -110 < z[1] < -100 and z[1] == z[2]  # underflowed y: the underflow point
    assert z[4] == pytest.approx(inversion.branch_point("mish", ()), abs=1e-6)  # below y*: z*
    assert z[5] == pytest.approx(3e38)


@backend_param
def test_mask_bits_are_the_left_branch_in_storage_order(backend):
    torch.manual_seed(2)
    kernels = backends.kernels(backend).bn_act_output
    cases = (((2, 3, 5, 7), False), ((3, 2, 3, 3), True), ((1, 1, 1, 5), False))
    for shape, channels_last in cases:
        x = torch.randn(shape) * 3
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        channels = shape[1]
        mean, scale = torch.randn(channels), torch.rand(channels) + 0.5
        shift = torch.randn(channels)
        branch = inversion.branch_point("mish", ())
        y, mask = kernels.forward(x, mean, scale, shift, None, branch, "mish", [])
        assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(x.numel() / 8)
        z = (x - mean[:, None, None]) * scale[:, None, None] + shift[:, None, None]
        assert torch.equal(torch_output.unpack_bits(mask, x), z < branch)
        torch.testing.assert_close(y, F.mish(z))


@backend_param
@pytest.mark.parametrize("case", FLAT, ids=_id)
def test_flat_activations_are_rejected_with_a_clear_error(backend, case):
    name, params = case
    with pytest.raises(ValueError, match=rf"(?s){name}.*cannot be inverted.*saves='input'"):
        BatchNormAct2d(4, name, saves="output", backend=backend, **params)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=rf"(?s){name}.*saves='input'"):
        batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5, name,
                       get_spec(name).bind((), params), backend, saves="output")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_ops_check_their_arguments():
    ops = torch.ops.mishkit
    x = torch.randn(2, 3, 4, 4)
    vec = torch.ones(3)
    with pytest.raises(ValueError, match=r"relu.*cannot be inverted"):
        ops.bn_act_output_forward(x, vec, vec, vec, None, 0.0, "relu", [])
    y, mask = ops.bn_act_output_forward(x, vec, vec, vec, None, -1.19, "mish", [])
    table = inversion.inverse_table("mish", torch.float32, "cpu")
    with pytest.raises(ValueError, match="mask"):
        ops.bn_act_output_backward_reduce(y, y, mask[:-1], vec, vec, None, table, "mish", [])
    with pytest.raises(ValueError, match="inverse table"):
        ops.bn_act_output_backward_reduce(y, y, mask, vec, vec, None, table[:10], "mish", [])
    with pytest.raises(TypeError, match="inverse table"):
        ops.bn_act_output_backward_reduce(y, y, mask, vec, vec, None, table.double(), "mish", [])
    with pytest.raises(ValueError, match="residual"):
        ops.bn_act_output_forward(x, vec, vec, vec, x[:1], 0.0, "mish", [])


def test_bad_saves_is_reported():
    with pytest.raises(ValueError, match="saves must be 'input' or 'output'"):
        BatchNormAct2d(3, "mish", saves="outputs")


@backend_param
def test_saves_one_tensor_when_the_next_layer_saves_the_output(backend):
    """conv -> BN+act -> conv keeps conv1's input, y (shared by conv2) and the 1-bit mask."""
    torch.manual_seed(3)

    def block(saves):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                             BatchNormAct2d(8, "mish", backend=backend, saves=saves),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False)).train()

    x = torch.randn(2, 3, 16, 16)
    tensor = 2 * 8 * 16 * 16 * 4  # one (2, 8, 16, 16) float32 tensor
    vectors = 3 * 8 * 4
    saved_input, saved_output = saved_bytes(block("input"), x), saved_bytes(block("output"), x)
    assert saved_input == x.numel() * 4 + 2 * tensor + 4 * 8 * 4  # x, bn input, y + 4 vectors
    assert saved_output == x.numel() * 4 + tensor + tensor // 32 + vectors


@backend_param
def test_no_grad_and_eval_take_the_input_path(backend):
    module = BatchNormAct2d(4, "mish", backend=backend, saves="output")
    plain = BatchNormAct2d(4, "mish", backend=backend)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        y, y_plain = module(x), plain(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_plain)
    module.eval()
    plain.eval()
    torch.testing.assert_close(module(x), plain(x))


@backend_param
def test_zero_weight_falls_back_to_saving_the_input(backend):
    module = BatchNormAct2d(4, "mish", backend=backend, saves="output")
    with torch.no_grad():
        module.weight[1] = 0.0
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 1 .*calls save their input"):
        y = module(x)
    assert "Output" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert torch.isfinite(module.weight.grad).all()


def test_double_backward_is_rejected():
    module = BatchNormAct2d(3, "mish", dtype=torch.float64, saves="output")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_module_repr_pickle_defaults_and_conversion_round_trip():
    bn = nn.BatchNorm2d(4)
    fused = BatchNormAct2d.from_batchnorm(bn, "silu", saves="output")
    assert fused.saves == "output" and "saves=output" in repr(fused)
    assert "saves" not in repr(BatchNormAct2d(4, "silu"))
    sync = SyncBatchNormAct2d.from_sync_batchnorm(nn.SyncBatchNorm(4), "gelu", saves="output")
    assert sync.saves == "output"
    legacy = BatchNormAct2d(4, "mish")
    del legacy.saves  # a module pickled before the option existed
    assert legacy.saves == "input"


def test_convert_fuse_bn_output():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model, report = convert(model, "mish", fuse_bn="output", report=True)
    fused = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert len(fused) == 2 and all(m.saves == "output" for m in fused)
    assert report.counts["fused_bn"] == 2
    with pytest.raises(ValueError, match=r"relu.*cannot be inverted.*fuse_bn=True"):
        convert(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), "relu", fuse_bn="output")
    with pytest.raises(ValueError, match="fuse_bn"):
        convert(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), "mish", fuse_bn="outputs")


def test_convert_keeps_non_invertible_pairs_on_the_input_path():
    """An activation outside the conversion (here: Hardswish, not replaced) that cannot be
    inverted is fused saving its input, and the report says so."""
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Hardswish(), nn.BatchNorm2d(4), nn.SiLU())
    model, report = convert(model, "mish", replace=(nn.SiLU,), fuse_bn="output", report=True)
    saves = [m.saves for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert saves == ["input", "output"]
    assert any("hardswish" in reason and "saves='input'" in reason
               for _, reason in report.skipped)


@backend_param
def test_residual_form_saves_output_and_residual_only(backend):
    torch.manual_seed(4)
    module = BatchNormAct2d(4, "mish", backend=backend, saves="output").train()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    r = torch.randn(2, 4, 6, 6, requires_grad=True)
    tensor = x.numel() * 4
    assert saved_bytes(lambda a, b: module(a, residual=b), x, r) == 2 * tensor + tensor // 32 + 48


@backend_param
def test_channels_last_input_with_contiguous_residual(backend):
    torch.manual_seed(5)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64)).to(memory_format=torch.channels_last)
    residual = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    weight, bias = _affine(3)
    grad = torch.randn_like(residual)
    _, got = fused_grads(x, weight, bias, grad, "gelu", {}, backend, residual)
    _, expected = reference_grads(x, weight, bias, grad, "gelu", {}, residual)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@backend_param
@pytest.mark.parametrize("layout", ["contiguous_3d", "channels_last_3d", "size-1 dims"])
def test_five_d_and_size_one_layouts(backend, layout):
    torch.manual_seed(6)
    if layout == "size-1 dims":  # (2, 3, 1, 1): contiguous and channels_last at once
        x = torch.randn(2, 3, 1, 1, dtype=torch.float64).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64)
        if layout == "channels_last_3d":
            x = x.to(memory_format=torch.channels_last_3d)
    residual = torch.randn(x.shape, dtype=torch.float64)  # contiguous whatever x is
    weight, bias = _affine(3)
    grad = torch.randn(x.shape, dtype=torch.float64)
    y, got = fused_grads(x, weight, bias, grad, "mish", {}, backend, residual)
    y_ref, expected = reference_grads(x, weight, bias, grad, "mish", {}, residual)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    if layout == "channels_last_3d":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_compiled_output_saving_module_matches_eager():
    """Under torch.compile the module lowers to torch ops (saves is then the compiler's
    choice): same values and gradients, whole graph, as eager saves='output'."""
    torch.manual_seed(7)
    module = BatchNormAct2d(4, "mish", saves="output").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = module(x)
    grad = torch.autograd.grad(y.square().sum(), x)[0]
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    y_compiled = compiled(x)
    grad_compiled = torch.autograd.grad(y_compiled.square().sum(), x)[0]
    torch.testing.assert_close(y_compiled, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-10, atol=1e-10)
    with pytest.raises(Exception, match="cannot be inverted"):
        torch.compile(lambda t: batch_norm_act(t, None, None, None, None, True, 0.1, 1e-5,
                                               "relu", (), saves="output"),
                      backend="aot_eager", fullgraph=True)(x)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_instruction_sets_agree_with_the_torch_kernels(capability, dtype, channels_last):
    from mishkit import _C

    torch.manual_seed(6)
    x = torch.randn(3, 19, 5, 7, dtype=dtype) * 3  # vector bodies and scalar tails
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad, residual = torch.randn_like(x), torch.randn_like(x)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(19, dtype=compute)
    scale, shift = (mean.abs() + 0.5) * torch.where(torch.arange(19) % 2 == 0, 1, -1), -mean
    table = inversion.inverse_table("silu", dtype, "cpu")
    branch = inversion.branch_point("silu", ())
    previous = _C.cpu_capability()

    def run(kernels):
        y, mask = kernels.forward(x, mean, scale, shift, residual, branch, "silu", [])
        *sums, z = kernels.backward_reduce(grad, y, mask, scale, shift, residual, table, "silu",
                                           [])
        elemt = [kernels.backward_elemt(grad, y, mask, recovered, scale, shift, residual, scale,
                                        shift, table, "silu", [])
                 for recovered in (z, z.new_empty(0))]  # the reduce pass's z, or recovered again
        return y, mask, sums, elemt

    try:
        try:
            _C.set_cpu_capability(capability)
        except RuntimeError as error:  # this CPU lacks the instruction set
            pytest.skip(str(error))
        got = run(backends.kernels("cpu").bn_act_output)
    finally:
        _C.set_cpu_capability(previous)
    expected = run(torch_output.KERNELS)
    assert torch.equal(got[1], expected[1])
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[2], expected[2], **tol)
    torch.testing.assert_close(got[3], expected[3], **tol)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_ops_pass_opcheck_and_have_fakes():
    x = torch.randn(2, 3, 4, 5)
    vec = torch.rand(3) + 0.5
    table = inversion.inverse_table("mish", torch.float32, "cpu")
    ops = torch.ops.mishkit
    y, mask = ops.bn_act_output_forward(x, vec, vec, vec, x, -1.19, "mish", [])
    *_, z = ops.bn_act_output_backward_reduce(x, y, mask, vec, vec, x, table, "mish", [])
    assert z.shape == y.shape and z.dtype == torch.float32  # kept for backward_elemt
    torch.library.opcheck(ops.bn_act_output_forward, (x, vec, vec, vec, None, -1.19, "mish", []))
    torch.library.opcheck(ops.bn_act_output_backward_reduce,
                          (x, y, mask, vec, vec, x, table, "mish", []))
    for recovered in (z, z.new_empty(0)):
        torch.library.opcheck(ops.bn_act_output_backward_elemt,
                              (x, y, mask, recovered, vec, vec, None, vec, vec, table, "mish", []))
    with pytest.raises(TypeError, match="z must be"):
        ops.bn_act_output_backward_elemt(x, y, mask, z.double(), vec, vec, None, vec, vec, table,
                                         "mish", [])


@backend_param
def test_training_matches_input_path_over_steps(backend):
    """A few SGD steps of conv -> BN+mish -> pool -> linear: both paths give the same model."""
    torch.manual_seed(7)

    def model(saves):
        torch.manual_seed(8)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6, "mish",
                             backend=backend, saves=saves), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(6, 2))

    a, b = model("input"), model("output")
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    for _ in range(3):
        x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(m(x), target).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_memory_table_variant_saves_about_one_tensor_per_block():
    from mishkit import memory

    def build():
        return memory.conv_bn_act_stack(lambda: nn.ReLU(inplace=True), widths=(8, 16),
                                        blocks_per_stage=2).train()

    torch.manual_seed(9)
    rows = memory.compare_variants(build, memory.mish_variants(), torch.randn(2, 3, 16, 16))
    ratio = {row.name: row.ratio for row in rows}
    # ReLU(inplace) keeps two tensors per block (BN input, ReLU output), saves="output" one
    assert ratio["mishkit_mish_fuse_bn_output"] < 0.6 * ratio["relu_inplace"]
    assert ratio["mishkit_mish_fuse_bn_output"] < 0.6 * ratio["mishkit_mish_fuse_bn"]


def _sync_worker(rank: int, port: int, names: list[str], results: dict) -> None:
    import torch.distributed as dist

    from .test_sync_bn_act import WORLD, _data, _rank_slice

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        x_full, grad_full, weight, bias = _data()
        out = {}
        for backend in names:
            module = SyncBatchNormAct2d(x_full.shape[1], "gelu", backend=backend, saves="output",
                                        dtype=torch.float64)
            with torch.no_grad():
                module.weight.copy_(weight)
                module.bias.copy_(bias)
            x = x_full[_rank_slice(rank)].clone().requires_grad_()
            y = module(x)
            y.backward(grad_full[_rank_slice(rank)])
            out[backend] = (y.detach(), x.grad, module.weight.grad, type(y.grad_fn).__name__)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_variant_over_two_processes_matches_the_full_batch():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from .test_sync_bn_act import WORLD, _data, _free_port, _rank_slice

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    names = [b for b in ("cpu", "torch") if b in BACKENDS]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(_free_port(), names, results), nprocs=WORLD, join=True)
        results = dict(results)
    x_full, grad_full, weight, bias = _data()
    y_ref, (grad_x, grad_w, _) = reference_grads(x_full, weight, bias, grad_full, "gelu", {})
    for backend in names:
        partial_grad_w = 0
        for rank in range(WORLD):
            y, gx, gw, grad_fn = results[rank][backend]
            assert "Output" in grad_fn
            torch.testing.assert_close(y, y_ref[_rank_slice(rank)])
            torch.testing.assert_close(gx, grad_x[_rank_slice(rank)])
            partial_grad_w = partial_grad_w + gw
        torch.testing.assert_close(partial_grad_w, grad_w)


class _Bottleneck(nn.Module):
    """A ResNet block whose shortcut has its own conv + BatchNorm (CSAIL's downsample)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu2(out)


def test_shortcut_norm_saves_its_output_too():
    torch.manual_seed(10)
    block = _Bottleneck().double().train()
    reference = convert(_Bottleneck().double().train(), "mish")
    reference.load_state_dict(block.state_dict())
    block, report = convert(block, "mish", fuse_bn="output", report=True)
    shortcut = block.downsample[1]
    assert isinstance(shortcut, BatchNormAct2d) and shortcut.saves == "output"
    assert (shortcut.activation, shortcut.activation_params) == ("leaky_relu", (1.0,))
    assert report.counts["fused_bn"] == 2 and report.counts["fused_bn_add"] == 1
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = block(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    # x (both convs), y1, the block output, r (shared by the shortcut norm and the block), masks
    tensor = 2 * 8 * 8 * 8
    expected = x.nbytes + tensor * 4 + 2 * tensor * 6 + sum(
        math.ceil(2 * c * 64 / 8) for c in (4, 6, 6))
    assert saved_bytes(block, x) == expected + 3 * (4 + 6 + 6) * 8  # + 3 (C,) float64 vectors
    structure = [(path, type(m).__name__, getattr(m, "saves", None))
                 for path, m in block.named_modules()]
    convert(block, "mish", fuse_bn="output")  # converting twice changes nothing more
    assert [(path, type(m).__name__, getattr(m, "saves", None))
            for path, m in block.named_modules()] == structure
    native = convert(block, "native")
    assert type(native.downsample[1]) is nn.BatchNorm2d


@backend_param
def test_elemt_takes_the_reduce_passs_z_or_recovers_it(backend):
    """backward_elemt with a given z (the CPU / torch reduce passes keep it) equals recovering z."""
    torch.manual_seed(11)
    kernels = backends.kernels(backend).bn_act_output
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2
    grad, residual = torch.randn_like(x), torch.randn_like(x)
    mean, shift = torch.randn(2, 3, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64) + 0.5
    table = inversion.inverse_table("gelu", torch.float64, "cpu")
    y, mask = kernels.forward(x, mean, scale, shift, residual, inversion.branch_point("gelu", ()),
                              "gelu", [])
    z = (x - mean[:, None, None]) * scale[:, None, None] + shift[:, None, None] + residual
    got = [kernels.backward_elemt(grad, y, mask, given, scale, shift, residual, scale, shift,
                                  table, "gelu", []) for given in (z, z.new_empty(0))]
    torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-9)
