"""mishkit.memory: saved-for-backward byte accounting, against hand-computed sizes."""

import pytest
import torch
from torch import nn

import mishkit
from mishkit import memory


def test_counts_each_saved_storage_once():
    x = torch.randn(10, 6, requires_grad=True)
    y = torch.randn(10, 6, requires_grad=True)
    assert memory.saved_tensor_bytes(lambda a, b: a * b, x, y).total == 2 * 60 * 4
    # x * x saves x twice: one storage
    assert memory.saved_tensor_bytes(lambda a: a * a, x).total == 60 * 4


def test_mishkit_mish_saves_only_its_input_naive_saves_more():
    x = torch.randn(32, 16, requires_grad=True)
    ours = memory.saved_tensor_bytes(mishkit.nn.Mish(), x)
    assert (ours.total, ours.tensors) == (x.nbytes, 1)
    naive = memory.saved_tensor_bytes(memory.NaiveMish(), x)
    # mul saves x and t = tanh(softplus(x)); tanh saves t; softplus saves x
    assert (naive.total, naive.tensors) == (2 * x.nbytes, 2)


def test_per_module_breakdown_and_parameters_apart():
    model = nn.Sequential(nn.Linear(4, 8), nn.Mish())
    x = torch.randn(5, 4, requires_grad=True)
    result = memory.saved_tensor_bytes(model, x)
    assert result.per_module == {"0": 5 * 4 * 4, "1": 5 * 8 * 4}
    assert result.total == 5 * 4 * 4 + 5 * 8 * 4
    assert result.parameter_bytes == 8 * 4 * 4  # the weight, saved for the input gradient
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inplace_relu_output_shares_the_batchnorm_output_storage():
    bn_relu = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(inplace=True)).train()
    bn_only = nn.Sequential(nn.BatchNorm2d(3)).train()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with_relu = memory.saved_tensor_bytes(bn_relu, x).total
    alone = memory.saved_tensor_bytes(bn_only, x).total
    assert with_relu == alone + x.nbytes  # relu's output: one more storage, counted once


def test_compare_variants_meets_the_issue_goals():
    torch.manual_seed(0)

    def build():
        return memory.conv_bn_act_stack(lambda: nn.ReLU(inplace=True), widths=(4, 8),
                                        blocks_per_stage=1).train()

    rows = memory.compare_variants(build, memory.mish_variants(), torch.randn(2, 3, 8, 8))
    saved = {row.name: row.saved_bytes for row in rows}
    assert rows[0].ratio == 1.0
    assert saved["mishkit_mish_fuse_bn"] <= saved["relu_inplace"]
    assert saved["mishkit_mish"] <= saved["torch_mish"] < saved["naive_mish"]
    assert "mishkit_mish_fuse_bn" in memory.format_rows(rows)


def test_bad_input():
    with pytest.raises(TypeError, match="module or function"):
        memory.saved_tensor_bytes(42, torch.randn(2))
    with pytest.raises(ValueError, match="no variants"):
        memory.compare_variants(nn.ReLU, {}, torch.randn(2))
