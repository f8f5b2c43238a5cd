"""Config loading: YAML merge, KEY VALUE overrides, unknown keys with close matches, types."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmentation.config import DEFAULTS, ConfigError, load_config, parse_overrides
from segmentation.models import CSAIL_CONFIGS, DECODERS, ENCODERS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "segmentation" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_csail_values():
    cfg = load_config()
    assert cfg.TRAIN.lr_pow == 0.9
    assert cfg.TRAIN.deep_sup_scale == 0.4
    assert cfg.DATASET.imgSizes == [300, 375, 450, 525, 600]
    assert cfg["TRAIN"]["lr_encoder"] == cfg.TRAIN.lr_encoder == 0.02


def test_yaml_then_overrides_with_yaml_typed_values(tmp_path):
    path = write(tmp_path, "TRAIN:\n  num_epoch: 3\n  lr_encoder: 0.1\nMODEL:\n  fc_dim: 512\n")
    cfg = load_config(path, ["TRAIN.num_epoch", "7", "DATASET.imgSizes", "[64, 96]",
                             "TRAIN.fix_bn", "true", "MODEL.fc_dim", "null",
                             "TRAIN.lr_decoder", "1e-3", "DIR", "2024"])
    assert cfg.TRAIN.num_epoch == 7 and isinstance(cfg.TRAIN.num_epoch, int)
    assert cfg.TRAIN.lr_encoder == 0.1  # from the file, not overridden
    assert cfg.DATASET.imgSizes == [64, 96]
    assert cfg.TRAIN.fix_bn is True
    assert cfg.MODEL.fc_dim is None
    assert cfg.TRAIN.lr_decoder == pytest.approx(0.001)
    assert cfg.DIR == "2024"  # string keys keep the text as typed
    assert DEFAULTS["TRAIN"]["num_epoch"] == 20  # defaults untouched


def test_int_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["TRAIN.lr_encoder", "1"]).TRAIN.lr_encoder == 1.0
    with pytest.raises(ConfigError, match=r"TRAIN.num_epoch .*expects int"):
        load_config(None, ["TRAIN.num_epoch", "2.5"])
    with pytest.raises(ConfigError, match=r"TRAIN.fix_bn .*expects bool"):
        load_config(None, ["TRAIN.fix_bn", "1"])


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("TRAIN.lr_encodr", "TRAIN.lr_encoder"), ("TRAIN.batch_size", "TRAIN.batch_size_per_gpu"),
     ("DATASET.imgsizes", "DATASET.imgSizes"), ("TRIAN.seed", "TRAIN.seed")],
)
def test_unknown_override_lists_close_matches(key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [key, "1"])
    message = str(info.value)
    assert key in message and "command line" in message and suggestion in message


def test_unknown_key_in_yaml_names_file_and_match(tmp_path):
    path = write(tmp_path, "MODEL:\n  arch_encodr: resnet18dilated\n")
    with pytest.raises(ConfigError, match=r"MODEL.arch_encodr.*cfg.yaml.*MODEL.arch_encoder"):
        load_config(path)


def test_bad_structure_and_values(tmp_path):
    with pytest.raises(ConfigError, match="odd number"):
        parse_overrides(["TRAIN.seed"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"TRAIN\.amp must be one of"):
        load_config(None, ["TRAIN.amp", "fp8"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "TRAIN: 3\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "TRAIN: [\n"))
    with pytest.raises(ConfigError, match=r"arms\[0\]"):
        load_config(None, ["EXPERIMENT.arms", "[{name: a}]"])


def test_section_override_from_command_line():
    cfg = load_config(None, ["DATASET.synthetic", "{enabled: true, size: 32}"])
    assert cfg.DATASET.synthetic.enabled is True and cfg.DATASET.synthetic.size == 32
    assert cfg.DATASET.synthetic.train == DEFAULTS["DATASET"]["synthetic"]["train"]


def test_shipped_configs_load_and_name_real_models():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    names = {p.stem for p in paths}
    for csail in CSAIL_CONFIGS:
        assert f"ade20k-{csail}" in names or f"ade20k-{csail.split('-')[0]}" in names, csail
        assert any(n.startswith(f"ade20k-{csail.split('-c1')[0]}") and n.endswith("-mish")
                   for n in names), f"no Mish variant for {csail}"
    assert {"synthetic-experiment", "synthetic-c1"} <= names
    for path in paths:
        cfg = load_config(path)
        assert cfg.MODEL.arch_encoder in ENCODERS, path
        assert cfg.MODEL.arch_decoder in DECODERS, path
        assert cfg.DATASET.padding_constant % cfg.DATASET.segm_downsampling_rate == 0, path


def test_train_cli_rejects_unknown_key_with_exit_2(capsys):
    from segmentation.train import main

    with pytest.raises(SystemExit) as info:
        main(["--cfg", str(CONFIG_DIR / "synthetic-c1.yaml"), "TRAIN.num_epochs", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "TRAIN.num_epochs" in err and "TRAIN.num_epoch" in err


# num_epoch of CSAIL's config/ade20k-*.yaml (semantic-segmentation-pytorch master), per config.
CSAIL_EPOCHS = {
    "mobilenetv2dilated-c1_deepsup": 20, "resnet18dilated-ppm_deepsup": 20,
    "resnet50dilated-ppm_deepsup": 20, "resnet101dilated-ppm_deepsup": 25,
    "resnet50-upernet": 30, "resnet101-upernet": 40, "hrnetv2": 30,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CSAIL_EPOCHS))
def test_ade_configs_train_csail_schedules_and_evaluate_their_last_epoch(name):
    for variant in (f"ade20k-{name}", f"ade20k-{name}-mish"):
        cfg = load_config(CONFIG_DIR / f"{variant}.yaml")
        t = cfg.TRAIN
        assert (t.num_epoch, t.epoch_iters, t.lr_encoder, t.lr_decoder) == (
            CSAIL_EPOCHS[name], 5000, 0.02, 0.02), variant
        assert cfg.VAL.checkpoint == f"epoch_{t.num_epoch}.pth", variant
