"""Index files, bad data, transforms, datasets, the batch sampler, make_odgt and the downloader."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segmentation.data import (
    CLASS_NAMES,
    PALETTE,
    AspectRatioBatchSampler,
    DatasetError,
    SampleSpec,
    TrainDataset,
    ValDataset,
    class_id,
    official_odgt,
    read_odgt,
)
from segmentation.data import download as dl
from segmentation.data.make_odgt import main as make_odgt_main
from segmentation.data.transforms import (
    downsample_label,
    eval_input_size,
    resize_label,
    scaled_size,
)

from .reference import (
    csail_scale,
    csail_train_sample,
    csail_train_size,
    csail_val_inputs,
    csail_val_size,
)

RNG = np.random.default_rng(0)


def _rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- class metadata and shipped index files ----


def test_class_names_and_palette():
    assert len(CLASS_NAMES) == 150 and PALETTE.shape == (150, 3)
    assert CLASS_NAMES[0] == "wall" and CLASS_NAMES[2] == "sky" and CLASS_NAMES[149] == "flag"
    assert class_id("person") == 12 and PALETTE[0].tolist() == [120, 120, 120]
    with pytest.raises(KeyError, match="unicorn"):
        class_id("unicorn")


def test_official_index_files_ship_with_the_package():
    train, val = read_odgt(official_odgt("training")), read_odgt(official_odgt("validation"))
    assert (len(train), len(val)) == (20210, 2000)
    assert train[0].fpath_img == "ADEChallengeData2016/images/training/ADE_train_00000001.jpg"
    assert (val[1].width, val[1].height, val[1].name) == (500, 364, "ADE_val_00000002")
    with pytest.raises(ValueError, match="root="):
        ValDataset(official_odgt("validation"))


# ---- odgt parsing ----

GOOD = {"fpath_img": "a.jpg", "fpath_segm": "a.png", "width": 4, "height": 3}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**GOOD, "width": "4"}), "'width' must be int"),
        (json.dumps({**GOOD, "height": True}), "'height' must be int"),
        (json.dumps({**GOOD, "height": 0}), "must be positive"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "fpath_segm"}), "missing key"),
        (json.dumps({**GOOD, "fpath_img": 7}), "'fpath_img' must be str"),
    ],
)
def test_malformed_index_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "x.odgt"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        read_odgt(path)
    assert f"{path}:3" in str(info.value)


def test_skip_bad_index_lines_logs_them(tmp_path, caplog):
    path = tmp_path / "x.odgt"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with caplog.at_level(logging.WARNING):
        records = read_odgt(path, skip_bad=True)
    assert len(records) == 1 and f"{path}:2" in caplog.text


def test_missing_or_empty_index(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_odgt(tmp_path / "none.odgt")
    (tmp_path / "e.odgt").write_text("\n")
    with pytest.raises(DatasetError, match="no records"):
        read_odgt(tmp_path / "e.odgt")


# ---- bad samples ----


def _bad_sample_cases(ds):
    """name -> (setup, expected message fragment); setup corrupts the ``bad`` sample."""

    def corrupt_image():
        ds.path_of("bad", "images").write_bytes(b"\x89PNG not really")

    def truncated_image():
        path = ds.path_of("bad", "images")
        path.write_bytes(path.read_bytes()[:60])

    def missing_annotation():
        ds.path_of("bad", "annotations").unlink()

    def size_mismatch():
        Image.fromarray(np.ones((5, 6), np.uint8), mode="L").save(ds.path_of("bad", "annotations"))

    def label_too_large():
        Image.fromarray(np.full((6, 8), 151, np.uint8), mode="L").save(
            ds.path_of("bad", "annotations")
        )

    def rgb_annotation():
        Image.fromarray(_rgb(6, 8)).save(ds.path_of("bad", "annotations"))

    return {
        "corrupt": (corrupt_image, "cannot read image"),
        "truncated": (truncated_image, "cannot read image"),
        "missing": (missing_annotation, "annotation file not found"),
        "mismatch": (size_mismatch, "image is 8x6 but its annotation"),
        "label": (label_too_large, "label value 151 out of range"),
        "rgb": (rgb_annotation, "single-channel"),
    }


CASES = ["corrupt", "truncated", "missing", "mismatch", "label", "rgb"]


def _two_samples(handmade):
    handmade.add("good", _rgb(6, 8), np.ones((6, 8)))
    handmade.add("bad", _rgb(6, 8), np.ones((6, 8)))
    return handmade.write_index()


@pytest.mark.parametrize("case", CASES)
def test_bad_sample_raises_naming_file_and_index_line(handmade, case):
    odgt = _two_samples(handmade)
    setup, message = _bad_sample_cases(handmade)[case]
    setup()
    for ds, item in ((TrainDataset(odgt), SampleSpec(1, 6, False)), (ValDataset(odgt), 1)):
        with pytest.raises(DatasetError, match=message) as info:
            ds[item]
        assert "bad.png" in str(info.value) and f"{odgt}:2" in str(info.value)
        assert ds[0 if isinstance(item, int) else SampleSpec(0, 6, False)] is not None


@pytest.mark.parametrize("case", ["corrupt", "label"])
def test_skip_bad_logs_the_sample_and_collate_drops_it(handmade, case, caplog):
    odgt = _two_samples(handmade)
    _bad_sample_cases(handmade)[case][0]()
    ds = TrainDataset(odgt, skip_bad=True, padding_constant=2, segm_downsampling_rate=1)
    with caplog.at_level(logging.WARNING):
        batch = ds.collate_fn([ds[SampleSpec(i, 6, False)] for i in (0, 1)])
    assert batch["name"] == ["good"] and "bad" in caplog.text
    assert ds.collate_fn([None]) is None
    val = ValDataset(odgt, skip_bad=True, img_sizes=(6,))
    assert val[1] is None and val.collate_fn([val[1]]) is None


def test_index_size_disagreeing_with_image_names_line(handmade):
    handmade.add("s", _rgb(6, 8), np.ones((6, 8)), width=9)
    odgt = handmade.write_index()
    with pytest.raises(DatasetError, match=r"index says 9x6.*:1\)"):
        ValDataset(odgt, img_sizes=(6,))[0]


# ---- transforms ----


def test_scaled_size_caps_long_side():
    assert scaled_size(100, 200, 50, 1000) == (50, 100)
    assert scaled_size(100, 400, 50, 120) == (30, 120)
    assert scaled_size(7, 10, 300, 1000) == (300, 428)  # 428.57 truncated, as CSAIL does
    assert scaled_size(281, 400, 300, 1000) == (299, 427)  # 299.99999999999994, too


ADE_SIDES = (300, 375, 450, 525, 600)


def _rounding_differs(height: int, width: int, side: int) -> bool:
    scale = min(side / min(height, width), 1000 / max(height, width))
    return any(int(n * scale) != round(n * scale) for n in (height, width))


def _has_ties(source: int, target: int) -> bool:
    """A NEAREST resize of ``source`` pixels to ``target`` samples a point exactly between two
    source pixels: (i + 1/2) * source / target is a whole number for some output i."""
    return any((2 * i + 1) * source % (2 * target) == 0 for i in range(target))


def test_training_sizes_truncate_like_csail_on_every_ade_image():
    records = read_odgt(official_odgt("training"))
    differs = 0
    for rec in records:
        for side in ADE_SIDES:
            expected = csail_train_size(rec.height, rec.width, side, 1000)
            assert scaled_size(rec.height, rec.width, side, 1000) == expected, (rec.name, side)
            differs += _rounding_differs(rec.height, rec.width, side)
    assert differs > 10_000  # rounding instead of truncating would change these pairs


def test_validation_inputs_truncate_like_csail_on_every_ade_image():
    grown = set()
    for index, rec in enumerate(read_odgt(official_odgt("validation"))):
        for side in ADE_SIDES:
            ours = eval_input_size(rec.height, rec.width, side, 1000, 8)
            assert ours == csail_val_size(rec.height, rec.width, side, 1000, 8), (rec.name, side)
            scale = min(side / min(rec.height, rec.width), 1000 / max(rec.height, rec.width))
            rounded = tuple(-(-round(n * scale) // 8) * 8 for n in (rec.height, rec.width))
            if rounded != ours:
                grown.add((index, side))
    assert len(grown) == 222  # pairs whose input would grow by 8 px if sizes were rounded


def _ade_training_cases(count: int):
    """The first training records whose sizes have NEAREST ties and a truncation that differs
    from rounding at some CSAIL short side: the cases that tell CSAIL's labels apart."""
    cases = []
    for rec in read_odgt(official_odgt("training")):
        for side in ADE_SIDES:
            h, w = csail_train_size(rec.height, rec.width, side, 1000)
            if _rounding_differs(rec.height, rec.width, side) and (
                    _has_ties(rec.height, h) or _has_ties(rec.width, w)):
                cases.append((rec, side))
                break
        if len(cases) == count:
            return cases
    raise AssertionError("the shipped index has no such records")


@pytest.mark.parametrize("rate", [1, 8])
def test_train_samples_equal_csail_pipeline_at_real_ade_sizes(handmade, rate):
    cases = _ade_training_cases(3)
    for i, (rec, _) in enumerate(cases):
        label = RNG.integers(0, 151, (rec.height, rec.width))
        handmade.add(f"s{i}", _rgb(rec.height, rec.width), label)
    ds = TrainDataset(handmade.write_index(), padding_constant=8, segm_downsampling_rate=rate)
    for i, (_, side) in enumerate(cases):
        image, label_png = (Image.open(handmade.path_of(f"s{i}", kind)).convert(mode)
                            for kind, mode in (("images", "RGB"), ("annotations", "L")))
        for flip in (False, True):
            sample = ds[SampleSpec(i, side, flip)]
            img, segm = csail_train_sample(image, label_png, side, 1000, rate, flip)
            assert torch.equal(sample["img"], img), (i, side, flip)
            np.testing.assert_array_equal(sample["segm"].numpy(), segm, err_msg=f"{i} {flip}")


def test_label_resize_is_pillow_nearest_with_its_tie_choice():
    rec, side = _ade_training_cases(1)[0]
    h, w = csail_train_size(rec.height, rec.width, side, 1000)
    label = RNG.integers(-1, 150, (rec.height, rec.width))
    expected = np.asarray(Image.fromarray((label + 1).astype(np.uint8)).resize(
        (w, h), Image.NEAREST), dtype=np.int64) - 1
    np.testing.assert_array_equal(resize_label(label, (h, w)), expected)
    # Sampling at exact pixel centres (the upper source pixel at a tie) gives another label.
    rows = np.minimum(((np.arange(h) + 0.5) * rec.height / h).astype(np.int64), rec.height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * rec.width / w).astype(np.int64), rec.width - 1)
    assert (label[rows[:, None], cols[None, :]] != expected).any()


def test_val_inputs_equal_csail_at_real_ade_sizes(handmade):
    picked = []
    for rec in read_odgt(official_odgt("validation")):
        scale_differs = [csail_val_size(rec.height, rec.width, s, 1000, 8) != tuple(
            -(-round(n * csail_scale(rec.height, rec.width, s, 1000)) // 8) * 8
            for n in (rec.height, rec.width)) for s in ADE_SIDES]
        if any(scale_differs):
            picked.append(rec)
        if len(picked) == 2:
            break
    for i, rec in enumerate(picked):
        handmade.add(f"v{i}", _rgb(rec.height, rec.width), RNG.integers(0, 151, (rec.height,
                                                                             rec.width)))
    ds = ValDataset(handmade.write_index(), img_sizes=ADE_SIDES)
    for i in range(len(picked)):
        image = Image.open(handmade.path_of(f"v{i}", "images")).convert("RGB")
        expected = csail_val_inputs(image, ADE_SIDES, 1000, 8)
        for ours, ref in zip(ds[i]["imgs"], expected, strict=True):
            assert torch.equal(ours.unsqueeze(0), ref)


def test_resize_label_never_invents_classes():
    label = RNG.integers(-1, 5, (7, 9))
    out = resize_label(label, (13, 4))
    assert out.shape == (13, 4) and set(np.unique(out)) <= set(np.unique(label))


def test_downsample_label_picks_cell_centres():
    label = RNG.integers(-1, 5, (9, 10))
    out = downsample_label(label, 4)
    assert out.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            y, x = 4 * i + 2, 4 * j + 2
            assert out[i, j] == (label[y, x] if y < 9 and x < 10 else -1)


def test_label_mapping_and_normalization(handmade):
    image = _rgb(4, 6)
    label = np.array([[0, 1, 150, 3, 3, 3]] * 4)
    handmade.add("m", image, label)
    sample = ValDataset(handmade.write_index(), img_sizes=(4,), padding_constant=2)[0]
    assert sample["segm"].dtype == torch.long and sample["segm"][0].tolist() == [
        -1,
        0,
        149,
        2,
        2,
        2,
    ]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (torch.from_numpy(image).permute(2, 0, 1).double() / 255 - mean) / std
    assert torch.allclose(sample["imgs"][0].double(), expected, atol=1e-5)


def test_train_sample_shapes_padding_and_downsampling(synthetic_root):
    ds = TrainDataset(
        synthetic_root / "training.odgt",
        img_max_size=60,
        padding_constant=8,
        segm_downsampling_rate=4,
    )
    samples = [ds[SampleSpec(i, 40, False)] for i in range(4)]
    for i, s in enumerate(samples):
        h, w = scaled_size(*ds.sizes[i], 40, 60)
        assert s["img"].shape == (3, h, w) and s["img"].dtype == torch.float32
        assert s["segm"].shape == (-(-h // 4), -(-w // 4))
    batch = ds.collate_fn(samples)
    _, _, bh, bw = batch["img"].shape
    assert bh % 8 == 0 and bw % 8 == 0 and batch["segm"].shape == (4, bh // 4, bw // 4)
    h, w = samples[0]["img"].shape[1:]
    assert (batch["img"][0, :, h:, :] == 0).all() and (batch["img"][0, :, :, w:] == 0).all()
    assert (batch["segm"][0, -(-h // 4) :, :] == -1).all()
    with pytest.raises(TypeError, match="SampleSpec"):
        ds[0]
    with pytest.raises(ValueError, match="multiple"):
        TrainDataset(synthetic_root / "training.odgt", padding_constant=6, segm_downsampling_rate=4)


def test_flip_moves_image_and_label_together(handmade):
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2] = 255  # white columns carry label 5, the rest label 1
    label = np.where(np.arange(6) < 2, 5, 1)[None].repeat(4, 0)
    handmade.add("f", image, label)
    ds = TrainDataset(handmade.write_index(), padding_constant=1, segm_downsampling_rate=1)
    plain, flipped = ds[SampleSpec(0, 4, False)], ds[SampleSpec(0, 4, True)]
    assert torch.equal(flipped["img"], plain["img"].flip(-1))
    assert torch.equal(flipped["segm"], plain["segm"].flip(-1))
    white = flipped["img"][0] > 0
    assert torch.equal(white, flipped["segm"] == 4)


def test_val_dataset_scales(synthetic_root):
    ds = ValDataset(synthetic_root / "validation.odgt", img_sizes=(16, 40), padding_constant=8)
    sample = ds[0]
    h, w = ds.sizes[0]
    assert sample["segm"].shape == (h, w)
    for img, short in zip(sample["imgs"], (16, 40)):
        assert img.shape[1] % 8 == 0 and img.shape[2] % 8 == 0
        assert min(img.shape[1:]) == -(-short // 8) * 8
    batch = ds.collate_fn([sample])
    assert batch["imgs"][1].shape[0] == 1 and batch["segm"].shape == (1, h, w)
    with pytest.raises(ValueError, match="one image"):
        ds.collate_fn([sample, sample])


# ---- batch sampler ----

SIZES = [(10, 20), (20, 10), (10, 10), (30, 20), (8, 16), (16, 8), (12, 24), (9, 9)] * 3


def _batches(**kw):
    return list(AspectRatioBatchSampler(SIZES, **{"batch_size": 2, "img_sizes": (3, 5, 7), **kw}))


def test_batches_share_aspect_group_and_scale():
    for batch in _batches(seed=4):
        groups = {SIZES[s.index][1] >= SIZES[s.index][0] for s in batch}
        assert len(groups) == 1 and len({s.short_side for s in batch}) == 1
        assert batch[0].short_side in (3, 5, 7)


def test_sampler_deterministic_per_seed_and_epoch():
    a = AspectRatioBatchSampler(SIZES, 2, (3, 5, 7), seed=1)
    b = AspectRatioBatchSampler(SIZES, 2, (3, 5, 7), seed=1)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    flips = [s.flip for batch in first for s in batch]
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("drop_last", [True, False])
def test_distributed_shards_equal_and_disjoint(drop_last):
    shards = [_batches(num_replicas=3, rank=r, drop_last=drop_last) for r in range(3)]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1
    assert lengths == {
        len(AspectRatioBatchSampler(SIZES, 2, (3,), num_replicas=3, rank=0, drop_last=drop_last))
    }
    seen = [s.index for shard in shards for batch in shard for s in batch]
    if drop_last:
        assert len(seen) == len(set(seen))
    else:
        assert set(seen) == set(range(len(SIZES)))


def test_sampler_rejects_impossible_setups():
    with pytest.raises(ValueError, match="no full batch"):
        AspectRatioBatchSampler(SIZES[:2], 4, (3,))
    with pytest.raises(ValueError, match="rank"):
        AspectRatioBatchSampler(SIZES, 2, (3,), num_replicas=2, rank=2)


def test_loader_output_independent_of_worker_count(synthetic_root):
    ds = TrainDataset(
        synthetic_root / "training.odgt", padding_constant=4, segm_downsampling_rate=4
    )

    def run(workers):
        sampler = AspectRatioBatchSampler(ds.sizes, 2, (16, 24), seed=7)
        sampler.set_epoch(2)
        return list(
            DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn, num_workers=workers)
        )

    for x, y in zip(run(0), run(2), strict=True):
        assert x["name"] == y["name"] and torch.equal(x["img"], y["img"])
        assert torch.equal(x["segm"], y["segm"])


# ---- make_odgt ----


def test_make_odgt_roundtrip(handmade, capsys):
    handmade.add("b", _rgb(5, 7), np.full((5, 7), 4))
    handmade.add("a", _rgb(6, 4), np.full((6, 4), 2))
    assert make_odgt_main([str(handmade.root), "--splits", "training"]) == 0
    records = read_odgt(handmade.root / "training.odgt")
    assert [(r.name, r.width, r.height) for r in records] == [("a", 4, 6), ("b", 7, 5)]
    assert records[0].fpath_segm == "ds/annotations/training/a.png"
    assert ValDataset(handmade.root / "training.odgt", img_sizes=(4,))[1]["segm"].unique() == 3
    assert "training: 2 records" in capsys.readouterr().out
    handmade.path_of("a", "annotations").unlink()
    with pytest.raises(SystemExit):
        make_odgt_main([str(handmade.root), "--splits", "training"])
    assert "a.png not found" in capsys.readouterr().err


# ---- downloader (never touches the network) ----


def test_no_network_gives_clear_message(tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dl.urllib.request, "urlopen", unreachable)
    with pytest.raises(SystemExit):
        dl.main(["--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert "no network" in err and str(tmp_path / dl.ARCHIVE_NAME) in err


class _Response(io.BytesIO):
    def __init__(self, data: bytes, status: int) -> None:
        super().__init__(data)
        self.status = status
        self.headers = {"Content-Length": str(len(data))}


def _server(payload: bytes, honour_range: bool, log: list):
    def urlopen(request, timeout=None):
        rng = request.get_header("Range")
        log.append(rng)
        if rng and honour_range:
            return _Response(payload[int(rng[6:-1]) :], 206)
        return _Response(payload, 200)

    return urlopen


@pytest.mark.parametrize("honour_range", [True, False])
def test_fetch_resumes_with_range_request(tmp_path, monkeypatch, honour_range):
    payload = bytes(range(256)) * 50
    dest = tmp_path / "f.zip"
    (tmp_path / "f.zip.part").write_bytes(payload[:1000])
    requests = []
    monkeypatch.setattr(dl.urllib.request, "urlopen", _server(payload, honour_range, requests))
    dl.fetch("http://example.invalid/f.zip", dest)
    assert dest.read_bytes() == payload and requests == ["bytes=1000-"]
    with pytest.raises(dl.DownloadError, match="does not match"):
        dl.verify(dest, "0" * 64)


def test_download_unpacks_and_indexes(tmp_path, monkeypatch, synthetic_root):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(synthetic_root.rglob("*")):
            if path.is_file() and path.suffix != ".odgt":
                zf.write(
                    path, "ADEChallengeData2016/" + path.relative_to(synthetic_root).as_posix()
                )
    payload = buffer.getvalue()
    monkeypatch.setattr(dl.urllib.request, "urlopen", _server(payload, True, []))
    monkeypatch.setattr(dl, "official_odgt", lambda split: synthetic_root / f"{split}.odgt")
    digest = hashlib.sha256(payload).hexdigest()
    written = dl.download_ade20k(tmp_path, sha256=digest)
    records = read_odgt(written["validation"])
    assert len(records) == 4 and records[0].fpath_img.startswith("ADEChallengeData2016/images/")
    monkeypatch.setattr(dl, "official_odgt", lambda split: official_odgt(split))
    with pytest.raises(dl.DownloadError, match="has 12 samples, ADE20K has 20210"):
        dl.download_ade20k(tmp_path)  # reuses the archive and the unpacked tree


def test_unpack_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(dl.DownloadError, match="escapes"):
        dl.unpack(archive, tmp_path / "root")
    assert not (tmp_path / "outside.txt").exists()
