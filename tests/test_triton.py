"""Triton-backend specifics: registration, configuration, layouts, special values, errors.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (CI). The shared cross-backend
checks (every activation against the float64 reference, gradcheck, ...) are in
tests/test_activations.py; this file covers what only the Triton backend has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs `pip install triton`")

from mishkit import ACTIVATIONS, get_spec  # noqa: E402
from mishkit.backends.triton import interpret_mode  # noqa: E402
from mishkit.functional import activation  # noqa: E402

from .helpers import SPECIAL, TOLERANCE  # noqa: E402

INTERPRET = interpret_mode()
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device: run with TRITON_INTERPRET=1 to interpret Triton on CPU",
        allow_module_level=True,
    )

from mishkit.backends.triton import act as tk  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # numpy (the interpreter's engine) warns on the overflows the formulas rely on: exp(1e4) = inf
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
DEVICE = "cpu" if INTERPRET else "cuda"
NAMES = sorted(ACTIVATIONS)


def defaults(name: str) -> list[float]:
    return list(get_spec(name).params.values())


def reference(name: str, x: torch.Tensor, params: list[float], derivative: bool = False):
    spec = get_spec(name)
    formula = spec.derivative if derivative else spec.reference
    return formula(x.double(), **spec.kwargs(tuple(params)))


def assert_matches(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """Close in value, and NaN / +-inf exactly where the float64 reference has them."""
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


# -- registration ---------------------------------------------------------------------------------


def test_kernel_table_covers_exactly_the_registry():
    assert tk.kernel_names() == NAMES
    from mishkit.backends.triton.math import ACTIVATION_IDS

    assert sorted(ACTIVATION_IDS.values()) == list(range(len(NAMES)))


def test_op_schemas():
    expected = {
        "triton_act_forward": "(Tensor x, str name, float[] params) -> Tensor",
        "triton_act_forward_": "(Tensor(a!) x, str name, float[] params) -> Tensor(a!)",
        "triton_act_backward": "(Tensor grad_out, Tensor x, str name, float[] params) -> Tensor",
    }
    for op, signature in expected.items():
        schema = str(getattr(torch.ops.mishkit, op).default._schema)
        assert schema == f"mishkit::{op}{signature}"


def test_out_of_place_ops_are_triton_ops_when_compiled():
    # triton_op registers a FunctionalTensorMode decomposition: what lets Inductor see the kernels.
    # Interpreted kernels can't be traced, so there the ops stay opaque graph nodes.
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for op in ("mishkit::triton_act_forward", "mishkit::triton_act_backward"):
        decomposed = FunctionalTensorMode in OPDEFS[op]._torch_dispatch_fns
        assert decomposed == (not INTERPRET and hasattr(torch.library, "triton_op"))


def test_fixed_config_when_interpreted_autotuned_on_gpu():
    from triton.runtime.autotuner import Autotuner

    for size in tk.ITEMSIZES:
        forward = tk._FORWARD[size]
        if INTERPRET:
            assert not isinstance(forward, Autotuner)
            assert tk._launch_meta(forward) == {"BLOCK": tk.INTERPRET_BLOCK}
        elif not tk.AUTOTUNE:  # MISHKIT_TRITON_AUTOTUNE=0
            assert tk._launch_meta(forward) == {"BLOCK": tk.FIXED_CONFIG.kwargs["BLOCK"],
                                                "num_warps": tk.FIXED_CONFIG.num_warps}
        else:
            assert isinstance(forward, Autotuner) and tk._launch_meta(forward) == {}
            assert forward.configs == tk.configs_for(size)
            assert tk._FORWARD_INPLACE[size].restore_value == ["x_ptr"]


@pytest.mark.parametrize(("dtype", "per_thread"), [(torch.float32, 8), (torch.bfloat16, 16),
                                                   (torch.float64, 4)])
def test_autotune_configs_keep_32_bytes_in_flight_per_thread(dtype, per_thread):
    itemsize = torch.empty((), dtype=dtype).element_size()
    kept = tk.configs_for(itemsize)
    assert kept and all(c.kwargs["BLOCK"] // (32 * c.num_warps) >= per_thread for c in kept)
    dropped = [c for c in tk._GPU_CONFIGS if c not in kept]
    assert all(c.kwargs["BLOCK"] // (32 * c.num_warps) < per_thread for c in dropped)
    fixed = tk.FIXED_CONFIG
    assert fixed.kwargs["BLOCK"] // (32 * fixed.num_warps) * itemsize >= 32


def test_kernels_compile_for_sm90_with_16_byte_accesses():
    # Offline compilation (Triton's own ptxas, no GPU) of the kernels as a GPU would run them,
    # not interpreted: every kernel compiles, and the unmasked / aligned paths move 16 bytes per
    # access (ld.global.v4 / v2.b64) rather than one element.
    script = Path(__file__).with_name("triton_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all kernels compiled" in result.stdout, result.stdout


def test_compiled_graph_keeps_the_ops_and_their_autograd():
    x = torch.randn(6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    compile_options = {"backend": "aot_eager" if INTERPRET else "inductor", "fullgraph": True}
    compiled = torch.compile(lambda t: tk.forward(t, "mish", []) * 2, **compile_options)
    compiled(x).sum().backward()
    x_ref = x.detach().cpu().requires_grad_(True)
    (reference("mish", x_ref, []) * 2).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad)

    inplace = torch.compile(lambda t: tk.forward_(t, "relu", []) + 1, **compile_options)
    z = torch.randn(5, device=DEVICE)
    expected = torch.relu(z)
    torch.testing.assert_close(inplace(z), expected + 1)
    torch.testing.assert_close(z, expected)  # the input was overwritten, as in eager mode


# -- values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_special_values_forward_and_backward(name, dtype):
    x = torch.tensor(SPECIAL, dtype=torch.float64).to(dtype).to(DEVICE)
    grad_out = torch.linspace(-2, 2, x.numel(), dtype=dtype, device=DEVICE)
    rtol, atol = TOLERANCE[dtype]
    params = defaults(name)
    y = tk.forward(x, name, params)
    want = reference(name, x.cpu(), params).to(dtype).double()
    assert y.dtype == dtype
    assert_matches(y.cpu(), want, rtol, atol)
    dx = tk.backward(grad_out, x, name, params)
    want = (grad_out.cpu().double() * reference(name, x.cpu(), params, True)).to(dtype).double()
    assert_matches(dx.cpu(), want, rtol, atol)


def test_bfloat16_subnormals_are_exact():
    # the interpreter's bf16 <-> fp32 casts flush subnormals; the kernels convert by bits
    x = torch.tensor([1e-39, -1e-39, 2e-40, 3e38, -3e38, 1.0], dtype=torch.bfloat16)
    y = tk.forward(x.to(DEVICE), "leaky_relu", [0.5]).cpu()
    assert torch.equal(y, torch.where(x > 0, x, x * 0.5))


@pytest.mark.parametrize(
    ("name", "params"),
    [("leaky_relu", [0.1]), ("elu", [0.3]), ("softplus", [2.0, 5.0]), ("softplus", [-0.7, 3.0])],
)
def test_parameters_keep_float64_precision(name, params):
    x = torch.linspace(-8, 8, 33, dtype=torch.float64, device=DEVICE)
    assert_matches(tk.forward(x, name, params).cpu(), reference(name, x.cpu(), params), 1e-13, 0)
    got = tk.backward(torch.ones_like(x), x, name, params).cpu()
    assert_matches(got, reference(name, x.cpu(), params, True), 1e-13, 0)


def test_gradcheck_with_non_default_parameters():
    x = torch.tensor([-4.0, -0.7, 0.3, 1.9, 6.0], dtype=torch.float64, device=DEVICE)
    for name, kwargs in (("softplus", {"beta": 1.5, "threshold": 4.0}), ("elu", {"alpha": 0.4})):

        def fn(t, name=name, kwargs=kwargs):
            return activation(t, name, backend="triton", **kwargs)

        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
        assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


# -- shapes and layouts ---------------------------------------------------------------------------


def test_zero_dim_and_empty():
    x = torch.tensor(-1.5, device=DEVICE)
    assert tk.forward(x, "mish", []).shape == ()
    torch.testing.assert_close(tk.forward(x, "mish", []).cpu(), torch.nn.functional.mish(x.cpu()))
    empty = torch.empty(0, 3, device=DEVICE)
    assert tk.forward(empty, "mish", []).shape == (0, 3)
    assert tk.backward(empty, empty, "mish", []).shape == (0, 3)


def test_channels_last_keeps_layout_without_copy():
    x = torch.randn(2, 3, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    y = tk.forward(x, "silu", [])
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, torch.nn.functional.silu(x))
    dx = tk.backward(torch.ones_like(x), x, "silu", [])
    assert dx.stride() == x.stride()


def test_non_dense_input_and_mismatched_grad_layout():
    base = torch.randn(6, 8, dtype=torch.float64, device=DEVICE)
    x = base[:, ::2]  # gaps in memory: processed as a contiguous copy
    want = reference("gelu", x.cpu(), [])
    assert_matches(tk.forward(x, "gelu", []).cpu(), want, 1e-12, 0)
    grad_out = torch.randn(4, 6, dtype=torch.float64, device=DEVICE).t()  # transposed strides
    dx = tk.backward(grad_out, x, "gelu", [])
    want = grad_out.cpu() * reference("gelu", x.cpu(), [], derivative=True)
    assert_matches(dx.cpu(), want, 1e-12, 0)


def test_grad_out_of_another_dtype_is_cast_to_x_dtype():
    x = torch.randn(7, device=DEVICE)
    grad_out = torch.randn(7, dtype=torch.float64, device=DEVICE)
    dx = tk.backward(grad_out, x, "mish", [])
    assert dx.dtype == torch.float32
    want = grad_out.cpu().float().double() * reference("mish", x.cpu(), [], derivative=True)
    assert_matches(dx.cpu(), want.float().double(), 4e-6, 1e-6)


def test_inplace_returns_its_input():
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    want = reference("mish", x.cpu(), [])
    out = tk.forward_(x, "mish", [])
    assert out is x
    assert_matches(x.cpu(), want, 1e-12, 0)
    y = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    untouched = y[:, 1::3].clone()
    view = y[:, ::3]  # non-dense: written back through the view
    want = reference("relu", view.cpu(), [])
    assert tk.forward_(view, "relu", []) is view
    assert_matches(y[:, ::3].cpu(), want, 0, 0)
    assert torch.equal(y[:, 1::3], untouched)


# -- errors ---------------------------------------------------------------------------------------


def test_bad_dtype_names_activation_and_dtype():
    with pytest.raises(TypeError, match=r"mish.*torch\.int64"):
        tk.forward(torch.arange(3, device=DEVICE), "mish", [])


def test_bad_arguments():
    x = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        tk.forward(x, "nope", [])
    with pytest.raises(ValueError, match=r"softplus takes 2 parameter\(s\)"):
        tk.forward(x, "softplus", [1.0])
    with pytest.raises(ValueError, match="exceeds float32 range"):
        tk.forward(x, "leaky_relu", [1e300])
    with pytest.raises(RuntimeError, match=r"grad_out has shape \(3,\) but x has shape \(4,\)"):
        tk.backward(torch.ones(3, device=DEVICE), x, "mish", [])
    with pytest.raises(RuntimeError, match="grad_out is on meta but x is on"):
        tk.backward(torch.ones(4, device="meta"), x, "mish", [])


@pytest.mark.skipif(not INTERPRET, reason="checks the CPU-interpreter device rule")
def test_interpreter_rejects_other_devices():
    with pytest.raises(RuntimeError, match="triton runs on CUDA tensors"):
        tk.forward(torch.ones(2, device="meta"), "mish", [])


# -- GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, no interpreter")
@pytest.mark.parametrize("name", ["mish", "softplus", "gelu"])
def test_autotuned_kernels_on_gpu(name):
    # tuned explicitly, whatever MISHKIT_TRITON_AUTOTUNE says: every config each dtype keeps is
    # timed, and the in-place launch must get its input restored between the trials
    forward, inplace, backward = (tk._tuned(tk._forward_kernel, autotune=True),
                                  tk._tuned(tk._forward_kernel, ["x_ptr"], autotune=True),
                                  tk._tuned(tk._backward_kernel, autotune=True))
    params = defaults(name)
    act, split = tk._resolve("test", torch.empty(1, device="cuda"), name, params)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 5000, device="cuda") * 6).to(dtype)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        tk._launch(forward, (x, y), act, split)
        tk._launch(backward, (torch.ones_like(x), x, dx), act, split)
        rtol, atol = TOLERANCE[dtype]
        want = reference(name, x.cpu(), params).to(dtype).double()
        assert_matches(y.cpu(), want, rtol, atol)
        want = reference(name, x.cpu(), params, derivative=True).to(dtype).double()
        assert_matches(dx.cpu(), want, rtol, atol)
        overwritten = x.clone()
        tk._launch(inplace, (overwritten, overwritten), act, split)
        torch.testing.assert_close(overwritten, y, rtol=0, atol=0, equal_nan=True)
