"""The training task both loops share: what a config trains, against what, and what an epoch's end does.

In the spirit of the task objects of tensorflow/models' ``official`` package, this module owns the model,
its losses and metrics, the monitored metric, the learning-rate schedule and the per-epoch bookkeeping
(timing, ``last.keras`` / ``best.keras``, ``log.csv``, early stopping, ``curves.png``). The two loops that
drive it are :func:`c3ae.train.train` (Keras ``fit``) and :func:`c3ae.distributed.train_multiworker` (a
custom loop, since ``fit`` does not run under ``MultiWorkerMirroredStrategy``, keras-team/keras#20585).
Both import from here; ``c3ae.train`` imports ``c3ae.distributed`` lazily, never the other way round.

Unknown labels (a gender of -1) are sample weights of 0 (``make_dataset(label_weights=True)``): the
losses are the stock Keras ones, and :func:`mean_over_labelled` makes Keras' default reduction the mean
over the labelled rows, which is what the masked losses of ``c3ae.losses`` compute.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from c3ae.config import Config, ConfigError
from c3ae.errors import C3AEError
from c3ae.files import atomic_path, atomic_write_text


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
    except (UsageError, ValueError, TypeError) as error:  # Keras' own checks: "filters=0" and the like
        raise ConfigError(f"model.options: {error}") from error


def losses_for(model: keras.Model, config: Config, train_ages: np.ndarray | None = None) -> tuple[dict, dict]:
    """Per-output losses and weights: the family spec's (``c3ae.models.<model.name>.SPEC.losses``).

    They expect the sample weights of :func:`mean_over_labelled` (unknown labels weigh 0)."""
    from c3ae.models.spec import family_spec

    try:
        return family_spec(config.model.name).losses(model, config.loss, train_ages)
    except C3AEError as error:
        raise ConfigError(str(error)) from error


def metrics_for(model: keras.Model) -> dict:
    """The compiled metrics per output (``c3ae.keras_metrics.metrics_for_outputs``)."""
    from c3ae.keras_metrics import metrics_for_outputs

    return metrics_for_outputs(model.output_names)


def per_example_losses(losses: dict) -> dict:
    """The same losses with reduction ``None``: one (sample-weighted) value per example, for a loop that
    reduces them itself. Keras' reductions would also divide a mean by ``num_replicas_in_sync`` inside a
    ``tf.distribute`` strategy."""
    copy = lambda loss: type(loss).from_config({**loss.get_config(), "reduction": None})
    return {name: copy(loss) for name, loss in losses.items()}


def mean_over_labelled(weights: dict) -> dict:
    """Per-output sample weights of one batch (from ``make_dataset(label_weights=True)``: the balance
    weight, 0 where the label is unknown) scaled by ``batch size / labelled rows`` (rows of weight > 0).

    Keras' default reduction divides the weighted sum by the batch size, so with these weights a loss is
    the weighted mean over the labelled rows only: the value the masked losses
    (``c3ae.losses.MaskedBinaryCrossentropy``, ``MaskedMeanAbsoluteError``) give, 0 (not NaN) for a batch
    without a labelled row. Outputs whose rows are all labelled keep their weights. This is how Keras
    itself weighs masked entries (``keras.src.losses.loss.apply_mask``). Per batch: apply it after batching,
    to the batch a step trains on (under ``MirroredStrategy`` the global batch, so the loss is the mean
    over its labelled rows however they fall on the replicas)."""
    import tensorflow as tf

    scaled = {}
    for name, weight in weights.items():
        labelled = tf.reduce_sum(tf.cast(weight > 0, weight.dtype))
        scaled[name] = weight * tf.math.divide_no_nan(tf.cast(tf.size(weight), weight.dtype), labelled)
    return scaled


def monitored_metric(model: keras.Model, validation: bool = True) -> tuple[str, str]:
    """(metric, mode) that picks the best checkpoint: validation age MAE, else gender accuracy, else loss;
    the training split's without a validation split."""
    names = model.output_names
    single = len(names) == 1
    if "age" in names:
        monitor, mode = ("val_mae" if single else "val_age_mae"), "min"
    elif "gender" in names:
        monitor, mode = ("val_acc" if single else "val_gender_acc"), "max"
    elif "age_group" in names:
        monitor, mode = ("val_acc" if single else "val_age_group_acc"), "max"
    else:
        monitor, mode = "val_loss", "min"
    return (monitor if validation else monitor.removeprefix("val_")), mode


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


def unwrap_single_input(dataset, model: keras.Model):
    """Single-input models take the bare tensor; C3AE's triple-box model takes the dict."""
    if dataset is None or isinstance(model.input, dict):
        return dataset
    name = model.inputs[0].name
    return dataset.map(lambda inputs, *rest: (inputs[name], *rest))  # rest: targets[, sample weights]


# ------------------------------------------------------------------------------------------------ the data
def _training_ages(manifest: dict) -> np.ndarray:
    from c3ae.preprocessing.shards import read_shard

    ages = [
        read_shard(s["path"], ["age"]).column("age").to_numpy()
        for s in manifest["shards"]
        if s["split"] == "train"
    ]
    return np.concatenate(ages) if ages else np.zeros(0)


def checked_training_ages(manifest: dict) -> np.ndarray:
    """The training split's known ages; raises when any lies outside [0, 120] years, with the count."""
    ages = _training_ages(manifest)
    known = ages[np.isfinite(ages)]
    out_of_range = int(((known < 0) | (known > 120)).sum())
    if out_of_range:
        raise TrainingError(f"{out_of_range} training ages lie outside [0, 120] years; fix the labels.")
    return known


# ------------------------------------------------------------------------------------ the end of an epoch
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
        with atomic_path(self.folder / name) as temporary:  # keeps ".keras", which Keras insists on
            self.model.save(temporary)

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
            atomic_write_text(self.folder / "best.json", json.dumps(record) + "\n")


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` (wall time of the epoch, validation included) to the logs, so that ``log.csv``
    and the model card can state the training time."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.monotonic() - self._started


class ResumedCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSV log that appends to an existing log in that log's columns (a resumed run's log may have
    been written with other keys): "NA" in those this run lacks, none for keys the log has no column for."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.append and not self.append_header:  # a log with a header: keep its columns
            import csv

            with open(self.filename, newline="") as handle:
                header = next(csv.reader(handle, delimiter=self.sep), None)
            if header and header[0] == "epoch":
                self.keys = header[1:]


def epoch_callbacks(config: Config, out: Path, monitor: str, mode: str) -> list:
    """What the end of an epoch does in both loops, in this order: time it (first, to be seen by the rest),
    keep ``last.keras`` and ``best.keras`` (:class:`AtomicBestCheckpoint`), append the row to ``log.csv``
    (:class:`ResumedCSVLogger`: a resumed run continues it), and, with ``train.early_stopping``,
    stop after that many epochs without a better ``monitor`` (the model's ``stop_training``)."""
    callbacks = [
        EpochTimer(),
        AtomicBestCheckpoint(out, monitor, mode),
        ResumedCSVLogger(str(out / "log.csv"), append=True),
    ]
    if config.train.early_stopping > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=config.train.early_stopping)
        )
    return callbacks


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "" or CSVLogger's "NA" (a validation column of a run without validation)
        return math.nan


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
        for prefix, style in (("", "o-"), ("val_", "s--")):  # markers: a one-epoch run shows its points
            if prefix + key in rows[0]:
                values = [_number(r[prefix + key]) for r in rows]
                axis.plot(epochs, values, style, markersize=4, label="validation" if prefix else "train")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if len(epochs) <= 12:
            axis.set_xticks(epochs)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_path(png) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
