"""``c3ae train``: fit a model family on a preprocessed dataset, resumably.

Outputs in the run folder: ``config.yaml`` (the resolved config), ``best.keras`` (best validation age MAE,
or loss for models without an age output; written atomically), ``last.keras``, ``log.csv``, ``tensorboard/``,
``backup/`` (BackupAndRestore: rerunning on the same folder resumes a killed run at its last finished epoch),
``curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from c3ae.config import Config, ConfigError, dump_config
from c3ae.errors import C3AEError
from c3ae.files import atomic_write_text

logger = logging.getLogger(__name__)

AGE_OUTPUTS = ("age",)


class TrainingError(C3AEError, RuntimeError):
    """Training cannot start (no data, unusable labels) or produced nothing usable."""


# ---------------------------------------------------------------------------------------------- model, losses
def build_model(config: Config) -> keras.Model:
    """The config's model: ``model.name`` (a family) built with ``model.options``."""
    from c3ae.errors import UsageError
    from c3ae.models.base import build_family

    options = dict(config.model.options)
    if config.data.input_size and "input_size" not in options:
        options["input_size"] = config.data.input_size
    try:
        return build_family(config.model.name, **options)
    except UsageError as error:
        raise ConfigError(f"model.options: {error}") from error


def losses_for(model: keras.Model, config: Config, train_ages: np.ndarray | None = None) -> tuple[dict, dict]:
    """Per-output losses and weights: the family spec's (``c3ae.models.<model.name>.SPEC.losses``)."""
    from c3ae.models.spec import family_spec

    try:
        return family_spec(config.model.name).losses(model, config.loss, train_ages)
    except C3AEError as error:
        raise ConfigError(str(error)) from error


def metrics_for(model: keras.Model) -> dict:
    """The compiled metrics per output (``c3ae.keras_metrics.metrics_for_outputs``)."""
    from c3ae.keras_metrics import metrics_for_outputs

    return metrics_for_outputs(model.output_names)


def monitored_metric(model: keras.Model) -> tuple[str, str]:
    """(metric, mode) that picks the best checkpoint: validation age MAE, else gender accuracy, else loss."""
    names = model.output_names
    single = len(names) == 1
    if "age" in names:
        return ("val_mae" if single else "val_age_mae"), "min"
    if "gender" in names:
        return ("val_acc" if single else "val_gender_acc"), "max"
    if "age_group" in names:
        return ("val_acc" if single else "val_age_group_acc"), "max"
    return "val_loss", "min"


def learning_rate_schedule(config: Config):
    """Epoch -> learning rate: cosine from lr to lr * min_lr_ratio, or steps, after an optional warm-up."""
    train = config.train

    def schedule(epoch: int, _lr: float | None = None) -> float:
        if epoch < train.warmup_epochs:
            return train.lr * (epoch + 1) / train.warmup_epochs
        if train.schedule == "constant":
            return train.lr
        if train.schedule == "step":
            return train.lr * train.step_factor ** sum(epoch >= e for e in train.step_epochs)
        span = max(train.epochs - train.warmup_epochs - 1, 1)
        progress = min((epoch - train.warmup_epochs) / span, 1.0)
        low = train.lr * train.min_lr_ratio
        return low + 0.5 * (train.lr - low) * (1 + math.cos(math.pi * progress))

    return schedule


# ------------------------------------------------------------------------------------------------ callbacks
class AtomicBestCheckpoint(keras.callbacks.Callback):
    """Save the model when the monitored metric improves: to a temporary name, then rename, so a full disk
    or a kill mid-save leaves the previous best file valid. Also keeps ``last.keras`` the same way."""

    def __init__(self, folder: Path, monitor: str, mode: str):
        super().__init__()
        self.folder, self.monitor, self.mode = Path(folder), monitor, mode
        self.best = math.inf if mode == "min" else -math.inf
        state = self.folder / "best.json"
        if state.is_file():  # resumed run: keep comparing against the earlier best
            self.best = json.loads(state.read_text()).get("value", self.best)

    def _save(self, name: str) -> None:
        target = self.folder / name
        temporary = self.folder / f".{name}.tmp-{os.getpid()}.keras"
        try:
            self.model.save(temporary)
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        self._save("last.keras")
        if value is None or not math.isfinite(value):
            return
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best = float(value)
            self._save("best.keras")
            record = {"epoch": epoch + 1, "metric": self.monitor, "value": self.best}
            (self.folder / "best.json").write_text(json.dumps(record) + "\n")


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` (wall time of the epoch, validation included) to the logs, so that ``log.csv``
    and the model card can state the training time."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.monotonic() - self._started


def _callbacks(config: Config, out: Path, monitor: str, mode: str) -> list:
    callbacks = [
        EpochTimer(),
        keras.callbacks.BackupAndRestore(str(out / "backup"), save_freq="epoch", delete_checkpoint=False),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LearningRateScheduler(learning_rate_schedule(config)),
        AtomicBestCheckpoint(out, monitor, mode),
        keras.callbacks.CSVLogger(str(out / "log.csv"), append=True),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False, profile_batch=0),
    ]
    if config.train.early_stopping > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=config.train.early_stopping)
        )
    return callbacks


# ------------------------------------------------------------------------------------------------ the run
def _training_ages(manifest: dict) -> np.ndarray:
    from c3ae.preprocessing.shards import read_shard

    ages = [
        read_shard(s["path"], ["age"]).column("age").to_numpy()
        for s in manifest["shards"]
        if s["split"] == "train"
    ]
    return np.concatenate(ages) if ages else np.zeros(0)


def init_weights_from(model: keras.Model, source: str, skip: Sequence[str] = ()) -> tuple[int, int]:
    """Copy weights from ``source`` (a .keras file or a bundled model's name) into ``model``, by weight path.

    Weights the source lacks, or holds with another shape (a new head, say), keep their fresh
    initialisation and are listed, as do those of layers whose name matches a ``skip`` pattern (fnmatch:
    ``"stage*_p"``), for donors with dead layers; a source that shares no weight at all is an error. A resumed
    run's backup still wins: it is restored afterwards. Returns (copied, total) weight tensor counts.
    """
    from c3ae.bundled import load_model

    try:
        donor = load_model(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.init_from: cannot load {source!r}: {error}") from error
    donor_weights = {weight.path: weight for weight in donor.weights}
    copied, reshaped, skipped = 0, [], set()
    for weight in model.weights:
        found = donor_weights.get(weight.path)
        if found is None:
            continue
        layer_name = weight.path.split("/")[0]
        if any(fnmatch.fnmatchcase(layer_name, pattern) for pattern in skip):
            skipped.add(layer_name)
            continue
        if tuple(found.shape) != tuple(weight.shape):
            reshaped.append(f"{weight.path} {tuple(found.shape)} -> {tuple(weight.shape)}")
            continue
        weight.assign(found.numpy())
        copied += 1
    if copied == 0:
        raise ConfigError(f"train.init_from: {source!r} shares no weights with model {model.name!r}.")
    if reshaped:
        logger.info(
            "init_from: %d weights have new shapes and start fresh: %s", len(reshaped), "; ".join(reshaped)
        )
    if skipped:
        logger.info(
            "init_from: %d layers start fresh (init_skip): %s", len(skipped), ", ".join(sorted(skipped))
        )
    return copied, len(model.weights)


def checked_training_ages(manifest: dict) -> np.ndarray:
    """The training split's known ages; raises when any lies outside [0, 120] years, with the count."""
    ages = _training_ages(manifest)
    known = ages[np.isfinite(ages)]
    out_of_range = int(((known < 0) | (known > 120)).sum())
    if out_of_range:
        raise TrainingError(f"{out_of_range} training ages lie outside [0, 120] years; fix the labels.")
    return known


def _strategy(config: Config):
    import tensorflow as tf

    if config.train.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def check_run_folder(config: Config, out: str | Path) -> None:
    """Refuse (``TrainingError``) a run folder that holds another model's run: resuming it would load the
    wrong weights, and its ``config.yaml`` would be overwritten."""
    import yaml

    previous = Path(out) / "config.yaml"
    if not previous.is_file():
        return
    try:
        earlier = (yaml.safe_load(previous.read_text()) or {}).get("model")
    except (yaml.YAMLError, AttributeError, OSError):
        earlier = None
    if earlier is not None and earlier != config.to_dict()["model"]:
        raise TrainingError(
            f"{out} holds a run of another model ({earlier.get('name')!r}, its config.yaml); resume it with "
            "the same model settings, or give another --out."
        )


def resolve_sources(config: Config) -> list[tuple[str, dict, float]]:
    """(name, manifest, weight) of the config's training sources, each checked before training: readable,
    with training rows, made with the same crop settings. Errors name the config key."""
    from c3ae.data import Source, read_manifest, read_sources, split_size

    sources = config.data.source_list()
    if not sources:
        raise ConfigError(
            "data.manifest is empty; set it (or data.sources) to a manifest.json from 'c3ae preprocess'."
        )
    keys = (
        ["data.manifest"] if not config.data.sources else [f"data.sources[{i}]" for i in range(len(sources))]
    )
    for key, source in zip(keys, sources, strict=True):
        try:
            info = read_manifest(source.manifest)
        except (OSError, ValueError) as error:  # missing, not JSON, not a c3ae manifest
            raise TrainingError(f"{key}: {error}") from error
        if split_size(info, "train") == 0:
            raise TrainingError(f"{key}: manifest {source.manifest} has no training rows.")
    try:
        return read_sources([Source(s.manifest, s.weight, s.name) for s in sources])
    except ValueError as error:
        raise TrainingError(f"data.sources: {error}") from error


def train(config: Config, out: str | Path) -> dict:
    """Train ``config`` into the folder ``out`` (resuming if it holds a killed run); returns the summary."""
    check_run_folder(config, out)
    if config.train.strategy == "multiworker":  # the strategy must start before any TensorFlow op
        if config.data.sources or config.data.balance:
            raise ConfigError(
                "train.strategy=multiworker trains on one data.manifest without data.balance; data.sources "
                "and balance weights need the default strategy for now."
            )
        from c3ae.distributed import train_multiworker

        return train_multiworker(config, out)
    out = Path(out)
    sources = resolve_sources(config)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    keras.utils.set_random_seed(config.train.seed)
    known = np.concatenate([checked_training_ages(info) for _, info, _ in sources])

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.train.precision)
    try:
        return _fit(config, out, sources, known)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def train_stages(stages: Sequence[tuple[str, Config]], out: str | Path) -> list[dict]:
    """Train a recipe's stages (from ``c3ae.config.load_stages``) one after the other into
    ``out/<k>-<name>/``, each starting from the previous stage's ``best.keras`` unless it names its own
    ``train.init_from``. A stage whose ``summary.json`` exists finished earlier and is skipped, so rerunning
    resumes the recipe. A plain config (one unnamed stage) trains into ``out`` itself."""
    out = Path(out)
    if len(stages) == 1 and not stages[0][0]:
        return [train(stages[0][1], out)]
    summaries, previous = [], None
    for index, (name, config) in enumerate(stages):
        folder = out / f"{index + 1}-{name}"
        if previous is not None and not config.train.init_from:
            config = dataclasses.replace(
                config, train=dataclasses.replace(config.train, init_from=str(previous))
            )
        finished = folder / "summary.json"
        if finished.is_file():
            logger.info("Stage %s finished earlier (%s); skipping it.", name, finished)
            summaries.append(json.loads(finished.read_text()))
        else:
            logger.info("Stage %d of %d: %s -> %s", index + 1, len(stages), name, folder)
            summaries.append({"stage": name, **train(config, folder)})
        previous = folder / "best.keras"
    return summaries


def _compiled_model(config: Config, known: np.ndarray) -> keras.Model:
    with _strategy(config).scope():
        model = build_model(config)
        if config.train.init_from:
            copied, total = init_weights_from(model, config.train.init_from, config.train.init_skip)
            logger.info(
                "init_from %s: copied %d of %d weight tensors.", config.train.init_from, copied, total
            )
        loss, weights = losses_for(model, config, known)
        model.compile(
            optimizer=keras.optimizers.Adam(config.train.lr),
            loss=loss,
            loss_weights=weights,
            metrics=metrics_for(model),
        )
    return model


def _fit(config: Config, out: Path, sources: list, known: np.ndarray) -> dict:
    from c3ae.data import Augmentation, Source, make_dataset, split_size

    model = _compiled_model(config, known)
    try:
        augmentation = Augmentation.from_dict(config.data.augmentation)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data.augmentation: {error}") from error
    common = {
        "model": config.model.name,
        "batch_size": config.data.batch_size,
        "outputs": list(model.output_names),
        "input_size": config.data.input_size,
        "seed": config.train.seed,
        "cache": config.data.cache,
        "context": config.data.context,
    }
    mixed = [Source(info, weight, name) for name, info, weight in sources]
    train_data = make_dataset(
        mixed if len(sources) > 1 else sources[0][1],
        split="train",
        augment=config.data.augment,
        balance=config.data.balance,
        augmentation=augmentation,
        **common,
    )
    validation = [
        (name, make_dataset(info, split="val", augment=False, **common))
        for name, info, _ in sources
        if split_size(info, "val") > 0
    ]
    steps = config.train.steps_per_epoch
    if steps is None and len(sources) > 1:  # the mix is endless: an epoch is one pass's worth of rows
        steps = math.ceil(sum(split_size(info, "train") for _, info, _ in sources) / config.data.batch_size)
    if config.train.steps_per_epoch:
        train_data = train_data.repeat()
    monitor, mode = monitored_metric(model)
    if not validation:
        monitor = monitor.removeprefix("val_")
    callbacks = _callbacks(config, out, monitor, mode)
    fit_validation = None
    if len(validation) == 1 and len(sources) == 1:
        fit_validation = _unwrap_single_input(validation[0][1], model)
    elif validation:  # before the checkpoint and early stopping, which read the mean it logs
        callbacks.insert(1, PerSourceValidation([(n, _unwrap_single_input(d, model)) for n, d in validation]))

    started = time.monotonic()
    history = model.fit(
        _unwrap_single_input(train_data, model),
        validation_data=fit_validation,
        epochs=config.train.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=config.train.verbose,
    )
    elapsed = time.monotonic() - started
    if not (out / "best.keras").is_file():
        raise TrainingError(f"No finite {monitor} was reached; nothing was saved (see {out / 'log.csv'}).")
    plot_curves(out / "log.csv", out / "curves.png")
    best = json.loads((out / "best.json").read_text())
    dead = _constant_layers(out / "best.keras", validation[0][1] if validation else train_data)
    if dead:
        logger.warning(
            "In %s these layers give every face the same output (dead units): %s",
            out / "best.keras",
            ", ".join(dead),
        )
    summary = {
        "family": config.model.name,
        "parameters": int(model.count_params()),
        "epochs_run": len(history.history.get("loss", [])),
        "best": best,
        "train_seconds_this_run": round(elapsed, 1),
        "final": {k: float(v[-1]) for k, v in history.history.items() if v},
        "constant_layers": dead,
        "sources": [
            {
                "name": name,
                "weight": weight,
                **{f"{split}_rows": split_size(info, split) for split in ("train", "val", "test")},
            }
            for name, info, weight in sources
        ],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class PerSourceValidation(keras.callbacks.Callback):
    """Validate on each source apart at the end of every epoch: logs ``val_<source>_<metric>`` for each,
    and ``val_<metric>`` as the mean over the sources (what checkpoints and early stopping compare)."""

    def __init__(self, datasets: list[tuple[str, object]]):
        super().__init__()
        self.datasets = datasets

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        results = {
            name: self.model.evaluate(data, verbose=0, return_dict=True) for name, data in self.datasets
        }
        for name, values in results.items():
            logs.update({f"val_{name}_{key}": float(value) for key, value in values.items()})
        for key in next(iter(results.values())):
            logs[f"val_{key}"] = float(np.mean([values[key] for values in results.values()]))


def _constant_layers(checkpoint: Path, dataset) -> list[str]:
    """Layers of the checkpoint whose output is the same for every face of one batch of ``dataset``."""
    from c3ae.diagnostics import constant_layers

    inputs, _ = next(iter(dataset))  # make_dataset's batches: a dict of named crops
    inputs = {name: np.asarray(crops) for name, crops in inputs.items()}
    if len(next(iter(inputs.values()))) < 2:  # one face cannot vary
        return []
    from c3ae.bundled import load_model

    return constant_layers(load_model(checkpoint), inputs)


def _unwrap_single_input(dataset, model: keras.Model):
    """Single-input models take the bare tensor; C3AE's triple-box model takes the dict."""
    if dataset is None or isinstance(model.input, dict):
        return dataset
    name = model.inputs[0].name
    return dataset.map(lambda inputs, *rest: (inputs[name], *rest))  # rest: targets[, sample weights]


def plot_curves(log_csv: Path, png: Path) -> None:
    """Loss, age MAE and gender accuracy per epoch (train and validation) from the CSV log."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    panels = [
        ("loss", ["loss"]),
        ("age MAE (years)", ["age_mae", "mae"]),
        ("gender accuracy", ["gender_acc"]),
    ]
    panels = [(title, [k for k in keys if k in rows[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels, strict=True):
        key = keys[0]
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in rows[0]:
                values = [float(r[prefix + key]) if r[prefix + key] else math.nan for r in rows]
                axis.plot(epochs, values, style, label="validation" if prefix else "train")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    from c3ae.files import atomic_path

    with atomic_path(png) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
