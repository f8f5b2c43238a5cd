"""Configuration: CSAIL-style nested keys (DATASET.*, MODEL.*, TRAIN.*, VAL.*), YAML + overrides.

    cfg = load_config("segmentation/configs/synthetic-c1.yaml", ["TRAIN.num_epoch", "2"])
    cfg.TRAIN.lr_encoder        # attribute access; cfg["TRAIN"]["lr_encoder"] works too

Every key must exist in :data:`DEFAULTS`: a YAML file or a command-line ``KEY VALUE`` pair with an
unknown key is rejected with the closest valid keys. Command-line values are parsed with
``yaml.safe_load`` (``2`` -> int, ``[300, 400]`` -> list, ``null`` -> None) and must have the
default's type (an int is accepted where a float is expected).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Keys whose default is None accept a value of the listed type (or None).
_NULLABLE: dict[str, tuple[type, ...]] = {
    "MODEL.fc_dim": (int,),
    "TRAIN.max_iters": (int,),
}

DEFAULTS: dict[str, Any] = {
    "DIR": "runs/default",
    "DATASET": {
        "root_dataset": "./data/",
        "list_train": "./data/ADEChallengeData2016/training.odgt",
        "list_val": "./data/ADEChallengeData2016/validation.odgt",
        "num_class": 150,
        "imgSizes": [300, 375, 450, 525, 600],
        "imgMaxSize": 1000,
        "padding_constant": 8,
        "segm_downsampling_rate": 8,
        "random_flip": True,
        "skip_bad": False,
        # Generated into root_dataset when list_train/list_val are missing (synthetic configs).
        "synthetic": {"enabled": False, "train": 200, "val": 50, "size": 96, "seed": 0},
    },
    "MODEL": {
        "arch_encoder": "resnet50dilated",
        "arch_decoder": "ppm_deepsup",
        "fc_dim": None,
        # Path or URL ("imagenet" for the encoder: CSAIL's ImageNet weights). With
        # weights_decoder set, eval and infer use this pair (CSAIL's encoder_epoch_N.pth /
        # decoder_epoch_N.pth) instead of VAL.checkpoint.
        "weights_encoder": "",
        "weights_decoder": "",
        "activation": "relu",
        "activation_scope": "all",
        "fuse_bn": False,
    },
    "TRAIN": {
        "batch_size_per_gpu": 2,
        "num_epoch": 20,
        "start_epoch": 0,
        "epoch_iters": 5000,
        "max_iters": None,  # default num_epoch * epoch_iters
        "optim": "SGD",
        "lr_encoder": 0.02,
        "lr_decoder": 0.02,
        "lr_pow": 0.9,
        "beta1": 0.9,
        "weight_decay": 1e-4,
        "deep_sup_scale": 0.4,
        "fix_bn": False,
        "workers": 4,
        "disp_iter": 20,
        "seed": 304,
        "shuffle": True,  # shuffle images and batch order each pass (False: dataset order)
        "device": "auto",  # auto | cpu | cuda
        "num_threads": 0,  # torch.set_num_threads on CPU; 0 keeps torch's default
        "amp": "none",  # none | bf16 | fp16
        "sync_bn": "auto",  # auto (when world size > 1) | true | false
        "deterministic": True,
        "resume": "",  # checkpoint path, or "auto" for DIR/checkpoints/last.pth if present
        "ckpt_dir": "",  # default DIR/checkpoints
        "ckpt_every": 1,  # epochs between checkpoints
        "progress": True,  # tqdm bar on rank 0
        "tensorboard": True,  # events when tensorboard is installed
        "eval_every": 0,  # epochs between validations during training; 0 = at the end only
    },
    "VAL": {
        "mode": "single",  # single | multi | sliding
        "single_size": 450,
        "imgSizes": [300, 375, 450, 525, 600],  # multi-scale short sides (CSAIL)
        "imgMaxSize": 1000,
        "flip": False,
        "crop_size": 512,  # sliding window
        "stride": 341,
        "checkpoint": "",  # default DIR/checkpoints/last.pth; unused with MODEL.weights_decoder
        "visualize": False,
        "visualize_max": 20,
        "absent": "zero",  # classes absent from GT and prediction: zero | ignore
        "max_images": 0,  # 0 = the whole list
        "workers": 2,
    },
    "EXPERIMENT": {
        "seeds": [0, 1, 2],
        # name, activation; optional scope (all|encoder|decoder), fuse_bn (bool, "input" or
        # "output"), and data_seed: an offset added to the seed for the data order and training
        # randomness only, the initial weights staying those of the seed (an A/A arm of the same
        # network measures the floor).
        "arms": [
            {"name": "relu", "activation": "relu", "scope": "all", "fuse_bn": False},
            {"name": "mish-decoder", "activation": "mish", "scope": "decoder", "fuse_bn": False},
            {"name": "mish-all", "activation": "mish", "scope": "all", "fuse_bn": False},
            {"name": "mish-all-fused", "activation": "mish", "scope": "all", "fuse_bn": True},
        ],
        "baseline": "relu",
        "jobs": 1,  # runs trained in parallel processes (local launcher, single-process mode)
        # Multipliers of TRAIN.lr_encoder/lr_decoder tried for every arm; each arm keeps the one
        # with the best mean validation mIoU. [] = the config's learning rates only.
        "lr_grid": [],
        "alpha": 0.05,  # two-sided level of the paired tests (Holm-corrected across arms)
        "power": 0.8,  # for the smallest detectable difference and the seeds needed
        "deltas": [0.01, 0.02, 0.05],  # Δ mIoU (fractions) the report gives the seeds needed for
        "bootstrap_resamples": 10000,  # per-image paired comparison
        "slurm": {  # --launcher slurm: one job per (arm, lr, seed), one DDP rank per task
            "partition": "",
            "account": "",
            "qos": "",
            "constraint": "",
            "nodes": 1,
            "gpus_per_node": 8,
            "tasks_per_node": 0,  # 0 = one per GPU (1 without GPUs)
            "cpus_per_task": 10,
            "mem_gb": 0,  # 0 = the partition's default
            "time_min": 1440,  # time limit of one job; a timed-out job is requeued and resumes
            "max_requeues": 10,  # requeues after timeouts (preemptions do not count)
            "array_parallelism": 64,  # jobs of the array running at once
            "exclusive": True,  # whole nodes: images/s is then measured with the machine alone
            "setup": [],  # shell lines run before the job (module load ..., source venv)
            "extra": [],  # further sbatch options as "key=value" (e.g. "mail-type=END")
        },
    },
}


class ConfigError(ValueError):
    """A config file or override that names an unknown key or has a value of the wrong type."""


class Config(dict):
    """A nested dict with attribute access (``cfg.TRAIN.lr_encoder``)."""

    def __init__(self, data: Mapping[str, Any] = ()) -> None:
        super().__init__()
        for key, value in dict(data).items():
            self[key] = Config(value) if isinstance(value, Mapping) else copy.deepcopy(value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo) -> Config:
        return Config(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (what checkpoints and YAML dumps store)."""
        return {
            k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()
        }

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, Mapping):
            keys += _flat_keys(value, path + ".")
    return keys


_ALL_KEYS = _flat_keys(DEFAULTS)


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _ALL_KEYS, n=4, cutoff=0.6)
    # Also match the last component alone: "TRAIN.lr_enc" -> "TRAIN.lr_encoder".
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in _ALL_KEYS}
    close += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _CommandLineText(str):
    """An override's raw text; parsed with YAML, except for string keys (``DIR 2024``)."""


def _parse_text(key: str, default: Any, text: _CommandLineText) -> Any:
    if isinstance(default, str):
        return str(text)
    if isinstance(default, float):
        try:
            return float(text)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value {text!r} of {key}: {err}") from None


def _check_value(key: str, default: Any, value: Any, where: str) -> Any:
    """``value`` converted to the default's type, or a ConfigError naming key and source."""
    if isinstance(value, _CommandLineText):
        value = _parse_text(key, default, value)
    if default is None:
        allowed = _NULLABLE.get(key, ())
        if value is None or (isinstance(value, allowed) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key} ({where}) must be null or {allowed}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if key == "MODEL.fuse_bn" and value in FUSE_BN_SAVES:
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if key == "TRAIN.sync_bn" and isinstance(value, bool):  # `true`/`false` in YAML
            return "true" if value else "false"
    elif isinstance(default, list) and isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(
        f"{key} ({where}) expects {_type_name(default)} like {default!r}, "
        f"got {_type_name(value)} {value!r}"
    )


def _merge(cfg: Config, updates: Mapping[str, Any], where: str, prefix: str = "") -> None:
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{prefix or 'config'} ({where}) must be a mapping, got {updates!r}")
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in cfg:
            while isinstance(value, Mapping) and value:  # name the full key: TRIAN.seed
                sub_key, value = next(iter(value.items()))
                path = f"{path}.{sub_key}"
            raise _unknown_key(path, where)
        if isinstance(cfg[key], Mapping):
            if isinstance(value, _CommandLineText):  # a whole section: `KEY "{a: 1}"`
                value = _parse_text(path, None, value)
            _merge(cfg[key], value, where, path + ".")
        else:
            cfg[key] = _check_value(path, _default(path), value, where)


def _default(path: str) -> Any:
    node: Any = DEFAULTS
    for part in path.split("."):
        node = node[part]
    return node


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["TRAIN.lr_encoder", "0.01", ...]`` -> nested dict of texts, parsed when merged."""
    if len(pairs) % 2:
        raise ConfigError(
            f"overrides come as KEY VALUE pairs; got an odd number ({len(pairs)}): {list(pairs)}"
        )
    nested: dict[str, Any] = {}
    for key, text in zip(pairs[0::2], pairs[1::2]):
        value = _CommandLineText(text)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``KEY VALUE`` overrides."""
    cfg = Config(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        _merge(cfg, data, str(path))
    _merge(cfg, parse_overrides(list(overrides)), "command line")
    validate(cfg)
    return cfg


_CHOICES = {
    "TRAIN.amp": ("none", "bf16", "fp16"),
    "TRAIN.sync_bn": ("auto", "true", "false"),
    "TRAIN.device": ("auto", "cpu", "cuda"),
    "VAL.mode": ("single", "multi", "sliding"),
    "VAL.absent": ("zero", "ignore"),
}


def validate(cfg: Config) -> Config:
    """Cross-field and range checks that the per-key type check cannot do."""
    for key, choices in _CHOICES.items():
        value = _lookup(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
    positive = ("TRAIN.batch_size_per_gpu", "TRAIN.num_epoch", "DATASET.num_class",
                "DATASET.padding_constant", "DATASET.segm_downsampling_rate", "TRAIN.ckpt_every")
    for key in positive:
        if _lookup(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {_lookup(cfg, key)}")
    if cfg.TRAIN.epoch_iters < 0:
        raise ConfigError("TRAIN.epoch_iters must be >= 0 (0 = one pass over the data)")
    if not cfg.DATASET.imgSizes or not cfg.VAL.imgSizes:
        raise ConfigError("DATASET.imgSizes and VAL.imgSizes need at least one size")
    validate_experiment(cfg.EXPERIMENT)
    return cfg


FUSE_BN_SAVES = ("input", "output")  # fuse_bn may also name what the fused norms save


def arm_fuse_bn(arm: Mapping[str, Any]) -> bool | str:
    """An arm's ``fuse_bn``: False, True, or what the fused norms save ("input"/"output")."""
    value = arm.get("fuse_bn", False)
    return value if value in FUSE_BN_SAVES else bool(value)


_ARM_KEYS = {"name": str, "activation": str, "scope": str, "fuse_bn": bool, "data_seed": int}


def validate_experiment(exp: Mapping[str, Any]) -> None:
    """The EXPERIMENT section: seeds, arms, baseline, LR grid, statistics and slurm settings."""
    seeds = exp["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"EXPERIMENT.seeds needs at least one integer seed, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"EXPERIMENT.seeds has repeated seeds: {seeds}")
    for i, arm in enumerate(exp["arms"]):
        if not isinstance(arm, Mapping):
            raise ConfigError(f"EXPERIMENT.arms[{i}] must be a mapping, got {arm!r}")
        missing = {"name", "activation"} - set(arm)
        extra = set(arm) - set(_ARM_KEYS)
        if missing or extra:
            raise ConfigError(
                f"EXPERIMENT.arms[{i}] = {dict(arm)}: needs name and activation, may have "
                f"scope, fuse_bn and data_seed (missing {sorted(missing)}, unknown {sorted(extra)})"
            )
        for key, value in arm.items():
            kind = _ARM_KEYS[key]
            if key == "fuse_bn" and value in FUSE_BN_SAVES:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"EXPERIMENT.arms[{i}].{key} must be {kind.__name__}, "
                                  f"got {value!r}")
        try:
            from mishkit.registry import get_spec

            get_spec(arm["activation"])
        except ValueError as err:
            raise ConfigError(f"EXPERIMENT.arms[{i}] ({arm['name']}): {err}") from None
        if arm.get("scope", "all") not in ("all", "encoder", "decoder"):
            raise ConfigError(f"EXPERIMENT.arms[{i}].scope must be all, encoder or decoder, "
                              f"got {arm['scope']!r}")
        if not arm["name"] or "/" in arm["name"]:
            raise ConfigError(f"EXPERIMENT.arms[{i}].name {arm['name']!r} must be a non-empty "
                              "folder name")
    names = [arm["name"] for arm in exp["arms"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"EXPERIMENT.arms names must be unique, got {names}")
    if exp["baseline"] not in names:
        raise ConfigError(f"EXPERIMENT.baseline {exp['baseline']!r} is not an arm: {names}")
    grid = exp["lr_grid"]
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in grid):
        raise ConfigError(f"EXPERIMENT.lr_grid holds positive LR multipliers, got {grid!r}")
    if len(set(grid)) != len(grid):
        raise ConfigError(f"EXPERIMENT.lr_grid has repeated multipliers: {grid}")
    for key in ("alpha", "power"):
        if not 0.0 < exp[key] < 1.0:
            raise ConfigError(f"EXPERIMENT.{key} must be in (0, 1), got {exp[key]}")
    if not all(isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0
               for d in exp["deltas"]):
        raise ConfigError(f"EXPERIMENT.deltas holds positive Δ mIoU fractions, got "
                          f"{exp['deltas']!r}")
    if exp["bootstrap_resamples"] < 100:
        raise ConfigError("EXPERIMENT.bootstrap_resamples must be >= 100, got "
                          f"{exp['bootstrap_resamples']}")
    if exp["jobs"] < 1:
        raise ConfigError(f"EXPERIMENT.jobs must be >= 1, got {exp['jobs']}")
    slurm = exp["slurm"]
    for key in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
        if slurm[key] < 1:
            raise ConfigError(f"EXPERIMENT.slurm.{key} must be >= 1, got {slurm[key]}")
    for key in ("gpus_per_node", "tasks_per_node", "mem_gb", "max_requeues"):
        if slurm[key] < 0:
            raise ConfigError(f"EXPERIMENT.slurm.{key} must be >= 0, got {slurm[key]}")
    for option in slurm["extra"]:
        if not isinstance(option, str) or "=" not in option or option.startswith("-"):
            raise ConfigError(f"EXPERIMENT.slurm.extra entries are sbatch options as "
                              f"\"key=value\" (no leading dashes), got {option!r}")
    if not all(isinstance(line, str) for line in slurm["setup"]):
        raise ConfigError(f"EXPERIMENT.slurm.setup holds shell lines, got {slurm['setup']!r}")


def _lookup(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node
