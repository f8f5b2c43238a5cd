"""mishkit.nn activation modules: drop-in parity with torch modules, construction, inplace."""

import copy
import pickle

import pytest
import torch
from torch import nn

import mishkit
import mishkit.nn as mnn
from mishkit.registry import ACTIVATIONS

from .helpers import assert_same_outputs_and_grads

# (mishkit module, torch module) built with the same constructor arguments
DROP_INS = [
    (lambda: mnn.ReLU(), lambda: nn.ReLU()),
    (lambda: mnn.LeakyReLU(0.2), lambda: nn.LeakyReLU(0.2)),
    (lambda: mnn.LeakyReLU(negative_slope=0.3, inplace=False), lambda: nn.LeakyReLU(0.3)),
    (lambda: mnn.ELU(0.5), lambda: nn.ELU(0.5)),
    (lambda: mnn.SELU(), lambda: nn.SELU()),
    (lambda: mnn.SiLU(), lambda: nn.SiLU()),
    (lambda: mnn.Mish(), lambda: nn.Mish()),
    (lambda: mnn.Hardswish(), lambda: nn.Hardswish()),
    (lambda: mnn.GELU(), lambda: nn.GELU()),
    (lambda: mnn.GELU("tanh"), lambda: nn.GELU(approximate="tanh")),
    (lambda: mnn.Softplus(2.0, 5.0), lambda: nn.Softplus(2.0, 5.0)),
]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("pair", DROP_INS, ids=lambda p: repr(p[1]()))
def test_module_matches_torch_module_forward_and_grad(pair, backend):
    ours, theirs = pair[0](), pair[1]()
    ours.backend = backend
    assert_same_outputs_and_grads(ours, theirs, torch.randn(3, 5, dtype=torch.float64) * 4)


def test_every_registered_activation_has_a_module():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    for name, spec in ACTIVATIONS.items():
        cls = getattr(mnn, spec.module_name)
        module = mnn.get_activation(name)
        assert isinstance(module, mnn.Activation) and module.activation == name
        if name != "gelu":  # GELU is the hand-written class taking approximate=
            assert type(module) is cls
        torch.testing.assert_close(module(x), spec.reference(x, **spec.params))


def test_params_are_readable_like_torch_attributes():
    m = mnn.LeakyReLU(0.25, True)
    assert (m.negative_slope, m.inplace) == (0.25, True)
    s = mnn.Softplus(beta=3)
    assert (s.beta, s.threshold) == (3.0, 20.0)


def test_extra_repr_like_torch():
    assert repr(mnn.ReLU(inplace=True)) == repr(nn.ReLU(inplace=True))
    assert repr(mnn.Mish()) == repr(nn.Mish())
    assert repr(mnn.GELU("tanh")) == repr(nn.GELU("tanh"))
    assert "backend='torch'" in repr(mnn.SiLU(backend="torch"))


def test_inplace_with_grad_computes_out_of_place_and_keeps_gradients():
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    h = x * 1.0  # non-leaf: torch would allow an in-place op on it
    before = h.detach().clone()
    y = mnn.Mish(inplace=True)(h)
    torch.testing.assert_close(h.detach(), before)  # input untouched: backward needs it
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    nn.functional.mish(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_inplace_without_grad_writes_into_the_input():
    x = torch.randn(8)
    expected = nn.functional.silu(x)
    with torch.no_grad():
        y = mnn.SiLU(inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


def test_get_activation_aliases_params_and_options():
    m = mnn.get_activation("swish", inplace=True, backend="torch")
    assert type(m) is mnn.SiLU and m.inplace and m.backend == "torch"
    m = mnn.get_activation("Leaky-ReLU".replace("-", "_"), negative_slope=0.5)
    assert m.negative_slope == 0.5
    assert mnn.get_activation("gelu", approximate="tanh").activation == "gelu_tanh"


def test_get_activation_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown activation 'mesh'.*mish.*swish"):
        mnn.get_activation("mesh")


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: mnn.ReLU(True, True), TypeError),
        (lambda: mnn.LeakyReLU(slope=0.1), TypeError),
        (lambda: mnn.Mish(inplace="yes"), TypeError),
        (lambda: mnn.ELU(alpha="big"), TypeError),
        (lambda: mnn.ELU(alpha=float("inf")), ValueError),
        (lambda: mnn.GELU("erf"), ValueError),
    ],
)
def test_bad_constructor_arguments(build, error):
    with pytest.raises(error):
        build()


def test_pickle_and_deepcopy_keep_class_and_settings():
    m = mnn.LeakyReLU(0.3, backend="torch")
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert type(clone) is mnn.LeakyReLU
        assert (clone.params, clone.backend) == (m.params, m.backend)


def test_torch_table_round_trip():
    for row in mnn.TORCH_EQUIVALENTS:
        spec = ACTIVATIONS[row.name]
        torch_module = mnn.to_torch(row.name, spec.bind((), {}), inplace=False)
        assert isinstance(torch_module, row.torch_class)
        assert mnn.from_torch(torch_module) == (row.name, spec.bind((), {}))
    assert mnn.from_torch(nn.LeakyReLU(0.2)) == ("leaky_relu", (0.2,))
    assert mnn.from_torch(nn.ReLU6()) is None
    with pytest.raises(ValueError, match=r"no torch\.nn equivalent"):
        mnn.to_torch("tanhexp")


def test_is_norm_and_fused_bn_reexports():
    assert mnn.is_norm(nn.BatchNorm2d(3)) and mnn.is_norm(nn.SyncBatchNorm(3))
    assert mnn.is_norm(mnn.BatchNormAct2d(3))
    assert not mnn.is_norm(nn.LayerNorm(3)) and not mnn.is_norm(mnn.Mish())
    assert mishkit.nn.SyncBatchNormAct2d.__name__ == "SyncBatchNormAct2d"


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_get_activation_takes_inplace_and_backend_for_every_name(name):
    spec = ACTIVATIONS[name]
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for inplace in (False, True):
        module = mnn.get_activation(name, inplace=inplace, backend="torch")
        assert (module.activation, module.inplace, module.backend) == (name, inplace, "torch")
        with torch.no_grad():
            y = module(x.clone())
        torch.testing.assert_close(y, spec.reference(x, **spec.params))
    assert "inplace=True" in repr(mnn.get_activation(name, inplace=True))
