"""Engine parts against independent references: LR schedule, parameter groups, loss,
checkpoint atomicity and weights_only loading, RNG round trip, statistics, prediction modes."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from segmentation.config import load_config
from segmentation.engine import checkpoint as ckpt
from segmentation.engine.evaluator import predict_scores
from segmentation.engine.loss import SegmentationLoss, pixel_counts
from segmentation.engine.optim import PolyLR, build_optimizer, param_groups
from segmentation.engine.stats import mean_std, paired_difference, student_t_ppf
from segmentation.engine.sync_bn import GlooSyncBatchNorm, convert_to_gloo_sync_bn


class TinySegmenter(nn.Module):
    """encoder/decoder with conv, BN and bias parameters (what param_groups must split)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.decoder = nn.Sequential(nn.Conv2d(4, 5, 1), nn.GroupNorm(1, 5))


def test_poly_lr_matches_formula():
    model = TinySegmenter()
    cfg = load_config(None, ["TRAIN.lr_encoder", "0.02", "TRAIN.lr_decoder", "0.1"])
    opt = build_optimizer(model, cfg.TRAIN)
    sched = PolyLR(opt, max_iters=10, power=0.9)
    for it in range(12):
        factor = max(0.0, 1 - it / 10) ** 0.9
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["encoder"] == pytest.approx(0.02 * factor, abs=1e-15)
        assert lrs["decoder_no_decay"] == pytest.approx(0.1 * factor, abs=1e-15)
        opt.step()
        sched.step()


def test_param_groups_no_decay_on_norm_and_bias():
    model = TinySegmenter()
    groups = {g["name"]: g for g in param_groups(model, 0.01, 0.1, 1e-4)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    enc, dec = model.encoder, model.decoder
    assert ids["encoder"] == {id(enc[0].weight)}
    assert ids["encoder_no_decay"] == {id(enc[1].weight), id(enc[1].bias)}
    assert ids["decoder"] == {id(dec[0].weight)}
    assert ids["decoder_no_decay"] == {id(dec[0].bias), id(dec[1].weight), id(dec[1].bias)}
    assert groups["encoder"]["weight_decay"] == 1e-4
    assert groups["decoder_no_decay"]["weight_decay"] == 0.0
    assert groups["encoder"]["lr"] == 0.01 and groups["decoder"]["lr"] == 0.1
    all_ids = [i for s in ids.values() for i in s]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def _reference_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over non-ignored pixels of -log softmax, in float64 by explicit loops."""
    total, count = 0.0, 0
    x = logits.double()
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                t = int(target[n, i, j])
                if t == -1:
                    continue
                column = x[n, :, i, j]
                total += float(torch.logsumexp(column, 0) - column[t])
                count += 1
    return total / count


def test_loss_is_ce_plus_weighted_deep_supervision():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=gen)
    aux = torch.randn(2, 5, 3, 4, generator=gen)
    target = torch.randint(-1, 5, (2, 3, 4), generator=gen)
    loss = SegmentationLoss(deep_sup_scale=0.4)(logits, target, aux)
    expected = _reference_ce(logits, target) + 0.4 * _reference_ce(aux, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert SegmentationLoss()(logits, target).item() == pytest.approx(
        _reference_ce(logits, target), rel=1e-5)


def test_loss_all_ignored_is_zero_with_gradient_and_bad_target_rejected():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss()(logits, torch.full((1, 2, 2), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(TypeError, match="int64"):
        SegmentationLoss()(logits, torch.zeros(1, 2, 2))


def test_pixel_counts_hand_case():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = logits[0, 1, 0, 1] = logits[0, 0, 1, 0] = logits[0, 2, 1, 1] = 1.0
    target = torch.tensor([[[2, 0], [0, -1]]])
    assert pixel_counts(logits, target) == (2, 3)


def test_atomic_save_interrupted_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt.atomic_save({"w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_after_partial_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")  # bytes reach the temporary file ...
        raise KeyboardInterrupt  # ... then the process is interrupted

    monkeypatch.setattr(torch, "save", crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_load_rejects_truncated_pickled_code_and_incomplete(tmp_path):
    good = tmp_path / "good.pth"
    ckpt.atomic_save({"model": {}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(truncated)
    evil = tmp_path / "evil.pth"
    torch.save({"fn": random.Random()}, evil)  # arbitrary objects need full unpickling
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(evil)
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(good)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "absent.pth")


def test_rng_states_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path / "c.pth", {
        "model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "iteration": 0,
        "rng": state, "config": load_config().to_dict()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_student_t_quantiles_match_tables():
    # Two-sided 95% critical values from standard t tables.
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert student_t_ppf(0.975, df) == pytest.approx(value, abs=1e-4)
    assert student_t_ppf(0.025, 3) == pytest.approx(-3.1824, abs=1e-4)


def test_paired_difference_by_hand():
    diff = paired_difference([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])
    # differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, half-width 4.3027 * 0.1 / sqrt(3)
    assert diff["mean"] == pytest.approx(0.1)
    assert diff["std"] == pytest.approx(0.1)
    assert diff["ci_high"] - diff["mean"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_std([1.0])[1])
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=8))
def test_mean_std_matches_numpy(values):
    mean, std = mean_std(values)
    assert mean == pytest.approx(float(np.mean(values)), abs=1e-9)
    assert std == pytest.approx(float(np.std(values, ddof=1)), abs=1e-9)


class PixelwiseModel(nn.Module):
    """1×1 convolution: translation-equivariant, so windows and flips cannot change scores."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("overrides", [
    ["VAL.mode", "sliding", "VAL.crop_size", "8", "VAL.stride", "5"],
    ["VAL.flip", "true"],
    ["VAL.mode", "sliding", "VAL.crop_size", "16", "VAL.stride", "3", "VAL.flip", "true"],
])
def test_prediction_modes_agree_on_a_pixelwise_model(overrides):
    torch.manual_seed(0)
    model = PixelwiseModel().eval()
    img = torch.randn(1, 3, 11, 13)
    single = predict_scores(model, [img], (11, 13), load_config())
    other = predict_scores(model, [img], (11, 13), load_config(None, overrides))
    torch.testing.assert_close(other, single, rtol=1e-5, atol=1e-6)
    reference = model(img).double().softmax(1)
    torch.testing.assert_close(single.double(), reference, rtol=1e-5, atol=1e-6)


def test_multi_scale_averages_resized_probabilities():
    torch.manual_seed(0)
    model = PixelwiseModel().eval()
    small, large = torch.randn(1, 3, 4, 6), torch.randn(1, 3, 8, 12)
    cfg = load_config(None, ["VAL.mode", "multi"])
    scores = predict_scores(model, [small, large], (8, 12), cfg)
    up = torch.nn.functional.interpolate(model(small), size=(8, 12), mode="bilinear",
                                         align_corners=False)
    expected = (up.softmax(1) + model(large).softmax(1)) / 2
    torch.testing.assert_close(scores, expected)


def test_gloo_sync_bn_single_process_equals_batchnorm():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    converted = convert_to_gloo_sync_bn(reference)
    assert isinstance(converted[1], GlooSyncBatchNorm)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(converted[1].state_dict())  # same keys as BatchNorm2d
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(converted[1](x), bn(x))
    torch.testing.assert_close(converted[1].running_var, bn.running_var)


def _ddp_worker(rank: int, port: int, result_file: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from segmentation.models import build_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        images = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
        labels = [torch.randint(-1, 150, (4, 4, 4)) for _ in range(2)]
        labels[0][:, 0, 0] = labels[1][:, 0, 0] = 0  # no all-ignored batch
        models = []
        for sync in (False, True):
            torch.manual_seed(1)
            model = build_model("mobilenetv2dilated", "c1_deepsup", sync_bn=sync)
            models.append((convert_to_gloo_sync_bn(model) if sync else model).double())
        single, synced = models
        shard = slice(2 * rank, 2 * rank + 2)
        for model, net, part in ((single, single, slice(None)),
                                 (synced, DistributedDataParallel(synced), shard)):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            for x, y in zip(images, labels):
                out = net(x[part])
                target = y[part]
                # Sum over pixels / global pixel count: the one-process loss, split over ranks.
                count = (y != -1).sum()
                loss = sum(torch.nn.functional.cross_entropy(o, target, ignore_index=-1,
                                                             reduction="sum")
                           for o in (out.logits, 0.4 * out.aux_logits)) / count
                if net is not model:
                    loss = loss * 2  # DDP averages gradients over the 2 ranks
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        a, b = single.state_dict(), synced.state_dict()
        worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
        if rank == 0:
            Path(result_file).write_text(repr(worst))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gloo_sync_bn_ddp_equals_one_process_in_float64(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tmp_path / "worst.txt"
    mp.spawn(_ddp_worker, args=(port, str(result)), nprocs=2)
    assert float(result.read_text()) < 1e-10
