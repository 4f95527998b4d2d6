"""``c3ae train``: fit a model family on a preprocessed dataset, resumably.

Outputs in the run folder: ``config.yaml`` (the resolved config), ``best.keras`` (best validation age MAE,
or loss for models without an age output; written atomically), ``last.keras``, ``log.csv``, ``tensorboard/``,
``backup/`` (:class:`AtomicBackupAndRestore`: rerunning on the same folder resumes a killed run at its last
finished epoch), ``curves.png`` and ``summary.json``. Every checkpoint is written to a temporary name and
renamed, so a full disk or a crash mid-write leaves the previous one whole. One training at a time holds
the folder (:class:`c3ae.run_folder.RunLock`); rerunning a finished run with the same config returns its
summary at once.

What a run trains (model, losses, metrics, monitored metric, schedule) and what the end of an epoch does
(checkpoints, ``log.csv``, early stopping) live in :mod:`c3ae.task`, shared with the multi-worker loop of
:mod:`c3ae.distributed` (imported here only when ``train.strategy=multiworker`` asks for it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from c3ae.config import Config, ConfigError, dump_config
from c3ae.files import TEMPORARY_MARK, atomic_write_text, remove_path
from c3ae.run_folder import RunLock, finished_summary
from c3ae.task import (  # noqa: F401 - the shared pieces, importable from here as before
    AtomicBestCheckpoint,
    EpochTimer,
    TrainingError,
    build_model,
    checked_training_ages,
    epoch_callbacks,
    learning_rate_schedule,
    losses_for,
    mean_over_labelled,
    metrics_for,
    monitored_metric,
    plot_curves,
    unwrap_single_input,
)

logger = logging.getLogger(__name__)

AGE_OUTPUTS = ("age",)


# ------------------------------------------------------------------------------------------------ callbacks
def _callbacks(config: Config, out: Path, monitor: str, mode: str) -> list:
    """``fit``'s callbacks: the shared end of an epoch (``c3ae.task.epoch_callbacks``, its timer first)
    around resuming (``backup/``), NaN stops, the learning-rate schedule and TensorBoard."""
    timer, *epoch_end = epoch_callbacks(config, out, monitor, mode)
    return [
        timer,
        AtomicBackupAndRestore(str(out / "backup")),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LearningRateScheduler(learning_rate_schedule(config)),
        *epoch_end,
        keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False, profile_batch=0),
    ]


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' resumable backup (``backup/latest.weights.h5`` and ``training_metadata.json``, saved at each
    epoch's end and kept after training), each file written to a temporary name and renamed: a full disk
    or a crash inside h5py mid-write leaves the previous epoch's backup whole, never a truncated file that
    a rerun would trust. A backup that cannot be read (one an older c3ae left truncated) stops the rerun
    with a sentence saying how to start over, not a traceback."""

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False, double_checkpoint=False)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError, KeyError) as error:
            raise TrainingError(
                f"The resume backup {self._weights_path} cannot be read ({type(error).__name__}: "
                f"{str(error)[:120]}); delete the folder {self.backup_dir} to restart this run from its "
                "first epoch, or give another --out."
            ) from error

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        weights = Path(self._weights_path)
        # Keras insists on the ".weights.h5" ending, which files.temporary_path would not keep whole.
        temporary = weights.with_name(f".latest{TEMPORARY_MARK}{os.getpid()}.weights.h5")
        try:
            self.model.save_weights(str(temporary), overwrite=True)
            os.replace(temporary, weights)
        except BaseException:
            remove_path(temporary)
            raise
        record = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        atomic_write_text(self._training_metadata_path, json.dumps(record))


# ------------------------------------------------------------------------------------------------ the run
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
        resolved = read_sources([Source(s.manifest, s.weight, s.name) for s in sources])
    except ValueError as error:
        raise TrainingError(f"data.sources: {error}") from error
    _check_teacher_labels(config, keys, resolved)
    return resolved


def _check_teacher_labels(config: Config, keys: list[str], resolved: list) -> None:
    """Every source with teacher shares is labelled, for its training split, by the teacher the config
    names: refused before training otherwise."""
    from c3ae.label import check_teacher_labels

    for key, source, (_, info, _) in zip(keys, config.data.source_list(), resolved, strict=True):
        if source.teacher:
            try:
                check_teacher_labels(info, "train", expected=config.data.teacher)
            except ValueError as error:
                raise TrainingError(f"{key}: {error}") from error


def train(config: Config, out: str | Path) -> dict:
    """Train ``config`` into the folder ``out`` (resuming if it holds a killed run); returns the summary.

    A folder whose run finished with this very config returns that run's summary at once. Another
    training holding ``out`` raises :class:`c3ae.run_folder.RunFolderBusyError`."""
    done = finished_summary(config.to_dict(), out)
    if done is not None:
        logger.info("%s finished earlier with this config (summary.json); nothing to train.", out)
        return done
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
    with RunLock(out):
        check_run_folder(config, out)  # again, now that no other training can write it
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
    with RunLock(out):
        return _train_stages(stages, out)


def _train_stages(stages: Sequence[tuple[str, Config]], out: Path) -> list[dict]:
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


def _datasets(config: Config, model: keras.Model, sources: list) -> tuple:
    """(training data, [(source name, validation data)]) from ``make_dataset`` with per-output label weights
    (unknown labels weigh 0; balance weights when ``data.balance``)."""
    from c3ae.data import Augmentation, Source, make_dataset, split_size

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
        "label_weights": True,
    }
    mixed = [Source(info, weight, name) for name, info, weight in sources]
    shares = [s.teacher or None for s in config.data.source_list()]
    train_data = make_dataset(
        mixed if len(sources) > 1 else sources[0][1],
        split="train",
        augment=config.data.augment,
        balance=config.data.balance,
        augmentation=augmentation,
        distill=shares if any(shares) else None,
        **common,
    )
    validation = [
        (name, make_dataset(info, split="val", augment=False, **common))
        for name, info, _ in sources
        if split_size(info, "val") > 0
    ]
    return train_data, validation


def _for_fit(dataset, model: keras.Model):
    """A ``make_dataset(label_weights=True)`` dataset as ``fit`` takes it: each batch's weights scaled to a
    mean over its labelled rows (``c3ae.task.mean_over_labelled``), a bare tensor for single-input models."""
    dataset = dataset.map(lambda inputs, targets, weights: (inputs, targets, mean_over_labelled(weights)))
    return unwrap_single_input(dataset, model)


def _fit(config: Config, out: Path, sources: list, known: np.ndarray) -> dict:
    from c3ae.data import split_size

    model = _compiled_model(config, known)
    train_data, validation = _datasets(config, model, sources)
    # The training stream repeats and an epoch is a number of steps (one pass's worth of rows unless
    # train.steps_per_epoch says otherwise), and every validation set has a counted length: Keras then
    # never runs out of data mid-epoch (its "Your input ran out of data" warning), shows the steps left,
    # and logs per-output losses over the true number of batches (with an unknown length it counts one
    # empty batch more, so val_age_loss read half of val_age_mae on a one-batch split).
    steps = config.train.steps_per_epoch or max(
        1, math.ceil(sum(split_size(info, "train") for _, info, _ in sources) / config.data.batch_size)
    )
    validation = [(name, with_counted_length(data)) for name, data in validation]
    monitor, mode = monitored_metric(model, validation=bool(validation))
    callbacks = _callbacks(config, out, monitor, mode)
    fit_validation = None
    if len(validation) == 1 and len(sources) == 1:
        fit_validation = _for_fit(validation[0][1], model)
    elif validation:  # before the checkpoint and early stopping, which read the mean it logs
        callbacks.insert(1, PerSourceValidation([(n, _for_fit(d, model)) for n, d in validation]))

    started = time.monotonic()
    history = model.fit(
        _for_fit(train_data.repeat(), model),
        validation_data=fit_validation,
        epochs=config.train.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=fit_verbosity(config),
        shuffle=False,  # make_dataset shuffles the training rows itself (fit's shuffle does nothing here)
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


def fit_verbosity(config: Config, stream=None) -> int:
    """``train.verbose``, or where it is unset: 1 (Keras' bar, per step) when ``stream`` (stdout) is a
    terminal, 2 (one line per epoch) when it goes to a file or a pipe, as a log wants it."""
    if config.train.verbose is not None:
        return config.train.verbose
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return 1 if isatty is not None and isatty() else 2


def with_counted_length(dataset):
    """``dataset`` with its number of batches, counted by one pass, asserted as its cardinality (a
    ``make_dataset`` dataset has none: rows without a label are dropped as they are read)."""
    import tensorflow as tf

    batches = int(dataset.reduce(np.int64(0), lambda count, *_: count + 1))
    return dataset.apply(tf.data.experimental.assert_cardinality(batches))


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

    inputs = next(iter(dataset))[0]  # make_dataset's batches: a dict of named crops, targets, weights
    inputs = {name: np.asarray(crops) for name, crops in inputs.items()}
    if len(next(iter(inputs.values()))) < 2:  # one face cannot vary
        return []
    from c3ae.bundled import load_model

    return constant_layers(load_model(checkpoint), inputs)
