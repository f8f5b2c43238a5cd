"""mishkit under torch.compile: ``backend="auto"`` lowers to torch ops carrying mishkit's numerics.

Compiling costs seconds per graph on 2 cores, so each test puts many cases into one graph, and most
use ``aot_eager`` (Dynamo + AOTAutograd, the lowering's whole path except code generation);
``aot_eager_decomp_partition`` adds Inductor's decompositions and its min-cut partitioner (what
decides the saved bytes), and a few cases run real Inductor code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import mishkit
import mishkit.functional as MF
from mishkit.batchnorm import BatchNormAct2d
from mishkit.memory import conv_bn_act_stack
from mishkit.registry import ACTIVATIONS, get_spec

from .helpers import DTYPES, PARAMS, assert_close, reference, reference_grad, saved_bytes
from .test_activations import grid
from .test_convert import Bottleneck

NAMES = list(ACTIVATIONS)
HAS_CPU_KERNELS = "cpu" in mishkit.available_backends("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend="aot_eager", **options):
    return torch.compile(fn, backend=backend, fullgraph=True, **options)


def every_activation(xs):
    return [MF.activation(x, name, **PARAMS.get(name, {})) for name, x in zip(NAMES, xs)]


# -- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", [*(("aot_eager", d) for d in DTYPES),
                                           ("inductor", torch.float32)], ids=str)
def test_every_activation_matches_float64_reference(backend, dtype):
    """The eager suite's special values (+-inf, nan, +-1e4, denormals, kinks) through a graph."""
    xs = [grid(dtype).requires_grad_() for _ in NAMES]
    ys = compiled(every_activation, backend)(xs)
    grad = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(ys, xs, [grad] * len(NAMES))
    for name, x, y, grad_x in zip(NAMES, xs, ys, grads):
        params = PARAMS.get(name, {})
        assert y.dtype == dtype, name
        assert_close(y.detach(), reference(name, x.detach(), **params), dtype)
        assert_close(grad_x, reference_grad(name, x.detach(), grad, **params), dtype)


# (activation, its parameters, BatchNormAct2d options): smooth, kinked and parametrized
# activations, and the BatchNorm options that change the statistics path
BN_CASES = [("mish", {}, {}), ("hardswish", {}, {"momentum": None}),
            ("softplus", {"beta": 2.0, "threshold": 5.0}, {"affine": False}),
            ("leaky_relu", {"negative_slope": 0.2}, {"track_running_stats": False})]


def _bn_pairs(dtype=torch.float64):
    """(BatchNormAct2d, nn.BatchNorm2d) per case, sharing non-trivial parameters and statistics."""
    pairs = []
    for activation, params, options in BN_CASES:
        fused = BatchNormAct2d(4, activation, dtype=dtype, **options, **params)
        bn = nn.BatchNorm2d(4, dtype=dtype, **options)
        with torch.no_grad():
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if bn.track_running_stats:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
        fused.load_state_dict(bn.state_dict())
        pairs.append((fused, bn))
    return pairs


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_act_matches_batchnorm_then_activation(training, residual):
    torch.manual_seed(0)
    pairs = _bn_pairs()
    for module in (m for pair in pairs for m in pair):
        module.train(training)
    shape = (3, 4, 5, 6)
    xs = [(torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_() for _ in pairs]
    rs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) if residual else None
          for _ in pairs]

    def run(xs, rs):
        return [fused(x, r) for (fused, _), x, r in zip(pairs, xs, rs)]

    ys = compiled(run)(xs, rs)
    for (fused, bn), (activation, params, _), x, r, y in zip(pairs, BN_CASES, xs, rs, ys):
        spec = get_spec(activation)
        x_ref = x.detach().clone().requires_grad_()
        r_ref = None if r is None else r.detach().clone().requires_grad_()
        z = bn(x_ref) if r_ref is None else bn(x_ref) + r_ref
        y_ref = spec.reference(z, **spec.kwargs(spec.bind((), params)))
        torch.testing.assert_close(y, y_ref, msg=activation)
        grad = torch.randn_like(y)
        inputs = [t for t in (x, r, fused.weight, fused.bias) if t is not None]
        inputs_ref = [t for t in (x_ref, r_ref, bn.weight, bn.bias) if t is not None]
        # one compiled graph computed every y: keep it for the next case's gradients
        for a, b in zip(torch.autograd.grad(y, inputs, grad, retain_graph=True),
                        torch.autograd.grad(y_ref, inputs_ref, grad)):
            torch.testing.assert_close(a, b, msg=f"{activation} gradients")
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(fused, buffer), getattr(bn, buffer)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, msg=f"{activation} {buffer}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_keep_float32_statistics(dtype):
    torch.manual_seed(5)
    fused = BatchNormAct2d(4, "mish")
    bn64 = nn.BatchNorm2d(4, dtype=torch.float64)
    x = ((torch.randn(4, 4, 8, 8) + 40).to(dtype)).requires_grad_()  # float16 sums would fail
    y = compiled(fused)(x)
    assert y.dtype == dtype and fused.running_mean.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    y_ref = F.mish(bn64(x64))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 4e-3, "atol": 4e-3}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(fused.running_var.double(), bn64.running_var, rtol=1e-2, atol=1e-3)
    grad = torch.randn_like(y_ref)
    (grad_x,) = torch.autograd.grad(y, x, grad.to(dtype))
    (grad_ref,) = torch.autograd.grad(y_ref, x64, grad)
    assert grad_x.dtype == dtype
    torch.testing.assert_close(grad_x.double(), grad_ref, rtol=5e-2, atol=5e-2)


def test_inductor_network_matches_eager():
    """Real Inductor code for a conv-BN-act chain with a fused residual end, forward + backward."""
    torch.manual_seed(0)
    eager = mishkit.convert(Bottleneck(8), "mish", fuse_bn=True).train()
    model = copy.deepcopy(eager)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(model, "inductor")(x), eager(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *model.parameters()], grad)
    expected = torch.autograd.grad(y_ref, [x_ref, *eager.parameters()], grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def test_channels_last_layout_is_kept():
    fused = BatchNormAct2d(4, "silu")
    x = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    y = compiled(lambda t: MF.gelu(fused(t)))(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


def test_inplace_under_no_grad():
    x = torch.randn(3, 7)
    expected = MF.mish(x)

    def fn(t):
        with torch.no_grad():
            return MF.mish(t, inplace=True)

    out = compiled(fn)(x)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(out, expected)


# -- the graph: what Inductor sees -----------------------------------------------------------------


def _aot_graph_targets(fn, *inputs) -> tuple[set[str], set[str]]:
    """The call targets of AOTAutograd's forward and backward graphs of ``fn(*inputs)``."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    out = compiled(fn, backend)(*inputs)
    out.sum().backward()
    forward, backward = graphs
    return forward, backward


def _conv_bn_act(backend: str, residual: bool):
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, "mish", backend=backend)

    def fn(x):
        h = conv(x)
        return MF.silu(bn(h, h * 0.5 if residual else None), backend=backend)

    return fn


@pytest.mark.parametrize("residual", [False, True])
def test_auto_lowers_to_torch_ops(residual):
    x = torch.randn(2, 3, 6, 6)
    forward, backward = _aot_graph_targets(_conv_bn_act("auto", residual), x)
    assert not [t for t in forward | backward if "mishkit" in t], (forward, backward)
    assert "aten.convolution.default" in forward and "aten.exp.default" in forward


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="mishkit._C is not built")
@pytest.mark.parametrize("residual", [False, True])
def test_forced_backend_keeps_its_kernels(residual):
    fn = _conv_bn_act("cpu", residual)
    forward, backward = _aot_graph_targets(fn, torch.randn(2, 3, 6, 6))
    assert {"mishkit.bn_act_stats.default", "mishkit.bn_act_forward.default",
            "mishkit.act_forward.default"} <= forward
    # the plain op's CPU reduce pass also stores dz (mishkit.batchnorm.autograd); the residual
    # op takes dz from the activation's backward op and reduces with the identity
    reduce = "backward_reduce" if residual else "backward_reduce_dz"
    assert {f"mishkit.bn_act_{reduce}.default", "mishkit.bn_act_backward_elemt.default",
            "mishkit.act_backward.default"} <= backward


def test_dynamic_shapes_compile_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4, "mish"),
                          mishkit.nn.Softplus(2.0))
    eager = copy.deepcopy(model)
    fn = compiled(model, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(2, 3, 8, 6), (3, 3, 5, 7), (5, 3, 9, 4)]:  # no equal sizes: no duck guards
            x = torch.randn(shape, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_()
            y, y_ref = fn(x), eager(x_ref)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            y.sum().backward()
            y_ref.sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def _stack(activation, fuse_bn: bool) -> nn.Module:
    torch.manual_seed(0)
    model = conv_bn_act_stack(lambda: nn.ReLU(inplace=True), widths=(8, 16), blocks_per_stage=2)
    model = nn.Sequential(model, nn.Conv2d(16, 4, 1))
    if activation == "native":
        return mishkit.convert(mishkit.convert(model, "mish"), "native")  # nn.Mish
    return mishkit.convert(model, "mish", fuse_bn=fuse_bn)


@pytest.mark.parametrize("model", ["stack", "bottleneck"])
def test_compiled_mishkit_saves_no_more_than_compiled_native(model):
    """With Inductor's partitioner, mishkit saves what the compiled native model saves."""
    if model == "stack":
        build = lambda kind: _stack(*kind)  # noqa: E731
        x = torch.randn(2, 3, 32, 32)
    else:
        def build(kind):
            torch.manual_seed(0)
            block = nn.Sequential(nn.Conv2d(3, 16, 1), Bottleneck(16))
            if kind[0] == "native":
                return mishkit.convert(mishkit.convert(block, "mish"), "native")
            return mishkit.convert(block, "mish", fuse_bn=kind[1])

        x = torch.randn(2, 3, 16, 16)
    sizes = {}
    for kind in [("native", False), ("mishkit", False), ("mishkit", True)]:
        module = build(kind).train()
        sizes[kind] = saved_bytes(compiled(module, "aot_eager_decomp_partition"), x)
    native = sizes.pop(("native", False))
    assert all(size <= native for size in sizes.values()), (native, sizes)


# -- double backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mish", "gelu_tanh", "softplus", "elu"])
def test_double_backward_where_the_compiler_has_it(name):
    params = PARAMS.get(name, {})
    x = (torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3)
    x.requires_grad_()
    # Dynamo alone runs the traced graph through autograd: twice differentiable, as in eager
    fn = compiled(lambda t: MF.activation(t, name, **params), "eager")
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_double_backward_through_aot_autograd_fails_as_for_native_ops():
    x = torch.randn(8, requires_grad=True)
    for fn in (F.mish, MF.mish):
        torch._dynamo.reset()
        (grad,) = torch.autograd.grad(compiled(fn)(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="does not currently support double backward"):
            grad.sum().backward()


# -- errors ----------------------------------------------------------------------------------------


def test_single_value_per_channel_is_reported():
    fused = BatchNormAct2d(3, "mish")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.compile(fused, backend="aot_eager")(torch.randn(1, 3, 1, 1))


# -- SyncBatchNormAct2d over 2 gloo processes ------------------------------------------------------


def _sync_worker(rank: int, port: int, results: dict) -> None:
    from .test_sync_bn_act import WORLD, _data, _rank_slice, sync_module

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        x_full, grad_full, weight, bias = _data()
        module = sync_module("auto", weight, bias)
        x = x_full[_rank_slice(rank)].clone().requires_grad_()
        y = compiled(module)(x)
        y.backward(grad_full[_rank_slice(rank)])
        results[rank] = {"y": y.detach(), "grad_x": x.grad, "grad_weight": module.weight.grad,
                         "grad_bias": module.bias.grad, "running_mean": module.running_mean,
                         "running_var": module.running_var}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_sync_batch_norm_act_matches_single_process_on_concatenated_batch():
    from .test_sync_bn_act import WORLD, _free_port, _rank_slice, single_process_reference

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
        results = dict(results)
    bn, x, y = single_process_reference()
    for rank in range(WORLD):
        got, local = results[rank], _rank_slice(rank)
        torch.testing.assert_close(got["y"], y[local])
        torch.testing.assert_close(got["grad_x"], x.grad[local])  # incl. the cross-rank terms
        torch.testing.assert_close(got["running_mean"], bn.running_mean)
        torch.testing.assert_close(got["running_var"], bn.running_var)
    # per-rank parameter gradients are partial sums of the full-batch gradient
    torch.testing.assert_close(sum(results[r]["grad_weight"] for r in range(WORLD)), bn.weight.grad)
    torch.testing.assert_close(sum(results[r]["grad_bias"] for r in range(WORLD)), bn.bias.grad)
