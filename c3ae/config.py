"""Typed training configuration: dataclasses loaded from YAML, with ``a.b=value`` overrides.

Unknown keys and values of the wrong type fail before anything is built, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FAMILIES = ("c3ae", "ssrnet", "dldl", "levi_hassner")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "c3ae"  # family: c3ae, ssrnet, dldl or levi_hassner
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the family's builder


@dataclass
class DataConfig:
    manifest: str = ""  # manifest.json written by `c3ae preprocess`
    batch_size: int = 64
    augment: bool = True
    cache: bool = True  # keep the (small) shard rows in memory after the first epoch
    input_size: int | None = None  # crop side; default: the family's
    # Visible window around the face in inner-box widths (0: the whole chip); recorded on the model card
    # so that inference masks the same way (c3ae.faces.mask_context).
    context: float = 0.0


@dataclass
class LossConfig:
    age: float = 1.0  # weight of MAE on `age` (L1)
    age_bins: float = 10.0  # weight of the distribution loss on `age_bins`
    gender: float = 1.0  # weight of the gender loss
    age_group: float = 1.0  # weight of Levi-Hassner's categorical cross-entropy
    bins_loss: str = "kl"  # C3AE: "kl" or "focal"
    label_smoothing: float = 0.02  # gender labels 0.99 / 0.01
    dldl_sigma: float = 2.0  # years, spread of DLDL's Gaussian label distribution


@dataclass
class TrainConfig:
    epochs: int = 60
    lr: float = 0.002
    schedule: str = "cosine"  # "cosine" (lr -> lr * min_lr_ratio), "step" or "constant"
    min_lr_ratio: float = 0.01
    step_epochs: list[int] = field(default_factory=lambda: [30, 60])
    step_factor: float = 0.1
    warmup_epochs: int = 0
    early_stopping: int = 20  # patience in epochs on the monitored metric; 0 disables
    seed: int = 0
    strategy: str = "default"  # "default", "mirrored" or "multiworker" (one process per worker, TF_CONFIG)
    precision: str = "float32"  # "float32" or "mixed_float16" (for GPUs; output heads stay float32)
    steps_per_epoch: int | None = None  # None: one pass over the training split
    verbose: int = 2  # Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch
    init_from: str | None = None  # start from these weights: a .keras file or a bundled model's name
    # layer names (fnmatch patterns, e.g. "stage*_p") that keep their fresh initialisation under init_from
    init_skip: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        if self.model.name not in FAMILIES:
            raise ConfigError(f"model.name: unknown family {self.model.name!r}; expected one of {FAMILIES}.")
        checks = [
            (self.data.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.data.context >= 0, "data.context must be >= 0"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (
                self.train.schedule in ("cosine", "step", "constant"),
                "train.schedule: cosine, step or constant",
            ),
            (
                self.train.strategy in ("default", "mirrored", "multiworker"),
                "train.strategy: default, mirrored or multiworker",
            ),
            (self.loss.bins_loss in ("kl", "focal"), "loss.bins_loss: kl or focal"),
            (
                self.train.precision in ("float32", "mixed_float16"),
                "train.precision: float32 or mixed_float16",
            ),
            (0 <= self.loss.label_smoothing < 1, "loss.label_smoothing must be in [0, 1)"),
            (self.loss.dldl_sigma > 0, "loss.dldl_sigma must be > 0"),
            (0 < self.train.min_lr_ratio <= 1, "train.min_lr_ratio must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message + ".")
        return self


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _accepts(annotation: Any, kind: type) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return kind in typing.get_args(annotation)
    return annotation is kind


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"Unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(names))}.")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key)
            continue
        if _accepts(annotation, float) and isinstance(value, str):
            value = _float_or_same(value)  # YAML 1.1 reads "1e-3" as a string
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, annotation):
            expected = getattr(annotation, "__name__", str(annotation))
            raise ConfigError(f"Config key {key} must be {expected}, got {value!r} ({type(value).__name__}).")
        values[name] = value
    return cls(**values)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data or {}, "").validate()


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=0.001", "model.options.se=true"]`` applied to a nested dict (values parsed as YAML)."""
    data = {**data}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override {override!r} must look like key=value, e.g. train.lr=0.001.")
        key, text = override.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"Override {override!r} has an empty key part.")
        node = data
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"Override {key}: cannot parse {text!r}: {error}.") from error
    return data


BUNDLED_CONFIGS = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the example configs shipped in the package (``c3ae train NAME`` finds them)."""
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, or the name of a bundled one such as ``"c3ae"``; ``None`` starts from the
    defaults) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and (BUNDLED_CONFIGS / f"{path}.yaml").is_file():
            path = BUNDLED_CONFIGS / f"{path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"Config file {path} not found; give a YAML path or one of: {', '.join(bundled_configs())}."
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}.") from error
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path} holds a YAML {type(data).__name__}; a config is a mapping of sections "
                "(model:, data:, train:), as in 'c3ae/configs/c3ae.yaml'."
            )
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
