"""Multi-worker data-parallel training (``train.strategy=multiworker``) with a custom training loop.

Keras 3's ``model.fit`` does not run under ``tf.distribute.MultiWorkerMirroredStrategy``
(keras-team/keras#20585), so :func:`train_multiworker` drives the training task of :mod:`c3ae.task` (the
same model, loss and metric objects, learning-rate schedule, checkpoints, ``log.csv`` and early stopping as
:func:`c3ae.train.train`) with its own loop. Start one process per worker, each with
``TF_CONFIG`` naming the cluster and its own task, e.g. for worker 1 of 2::

    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 1}}'

All workers read the same config and manifest. How the run is split:

- ``data.batch_size`` is the batch of ONE worker; a step consumes ``batch_size * num_workers`` rows and the
  gradients are summed across workers by the optimizer (each replica's loss is already divided by that
  global batch), so one step equals a single-machine step on the global batch.
- Each worker builds the same seeded, repeated row stream of :func:`c3ae.data.make_dataset` and keeps every
  ``num_workers``-th row (``unbatch().shard(num_workers, index)``, then batches with ``drop_remainder``):
  the workers see disjoint rows and every worker can always produce a batch, so no collective can hang on
  a worker that ran out of data. An epoch is ``train.steps_per_epoch`` steps, or
  ``ceil(usable training rows / global batch)``, computed from the manifest identically on every worker
  (and checked across workers before the first step). Sharding comes after ``make_dataset``'s decoding and
  cropping, so each worker prepares every row and keeps its share: simple and exact, but the input
  pipeline does ``num_workers`` times the work of the training rows (fine while the model dominates).
- BatchNormalization layers are switched to synchronized BN (``layer.synchronized = True``, which Keras
  3.15 reads at call time: the batch moments are a cross-replica sum), so normalisation uses the statistics
  of the global batch and the moving mean/variance stay identical on all workers. The saved ``.keras``
  files have it switched back off (the flag is TensorFlow-only and changes nothing at inference).
- Losses: the task's Keras loss objects with reduction ``None`` (``c3ae.task.per_example_losses``), fed the
  label weights of ``make_dataset(label_weights=True)`` (unknown labels weigh 0); each output's sum is
  divided by its labelled rows over all replicas, so the loss of a step is ``fit``'s loss of the global
  batch. Metrics: the task's Keras metric objects, whose states (sums and counts) are all-reduced.
- Validation: each worker evaluates its share of the validation rows; the sums are all-reduced once.
- Only the chief (worker 0, or the ``chief`` task) writes ``config.yaml``, ``log.csv``, ``best.keras``
  (best validation metric as in ``c3ae train``, i.e. age MAE when there is an age output; the training
  split's without a validation split), ``last.keras`` (each to a temporary name, then renamed),
  ``best.json``, ``tensorboard/``, ``curves.png`` and ``summary.json``. Every worker takes part in the
  resumable ``tf.train.Checkpoint`` save (collective ops may be involved); the chief writes to
  ``backup/``, the others to a temporary folder they delete. A rerun restores ``backup/`` where it can,
  then copies the chief's state to every worker, so it continues from the last finished epoch even
  without a shared file system.
- A non-finite loss stops the run at once on every worker (the loss is the all-reduced one), like
  ``TerminateOnNaN``; the broken epoch is not saved, so ``best.keras``, ``last.keras`` and ``backup/`` keep
  the last good state. ``train.early_stopping`` stops every worker together on the chief's decision.
  The end of an epoch on the chief is ``c3ae.task.epoch_callbacks``, the Keras callbacks ``fit`` runs.

:class:`~tf.distribute.MultiWorkerMirroredStrategy` must be created before any other TensorFlow operation
runs in the process, so call :func:`train_multiworker` before using TensorFlow otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from c3ae.config import Config, ConfigError, dump_config
from c3ae.task import (
    TrainingError,
    build_model,
    checked_training_ages,
    epoch_callbacks,
    learning_rate_schedule,
    losses_for,
    metrics_for,
    monitored_metric,
    per_example_losses,
    plot_curves,
    unwrap_single_input,
)

logger = logging.getLogger(__name__)

BACKUP_DIR = "backup"
TASK_TYPES = ("chief", "worker")


class TFConfigError(ConfigError):
    """``TF_CONFIG`` is missing or does not describe a chief/worker cluster and this process's task."""


# ------------------------------------------------------------------------------------------------ TF_CONFIG
@dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the cluster, from ``TF_CONFIG``."""

    chief: tuple[str, ...]  # the ``chief`` task's address, or ()
    workers: tuple[str, ...]  # the ``worker`` tasks' addresses
    task_type: str  # "chief" or "worker"
    task_index: int

    @property
    def num_workers(self) -> int:
        return len(self.chief) + len(self.workers)

    @property
    def worker_index(self) -> int:
        """Position in chief + workers: 0 is the chief (or worker 0 when there is no chief task)."""
        return self.task_index if self.task_type == "chief" else len(self.chief) + self.task_index

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


_EXAMPLE = '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}'


def parse_tf_config(text: str | None = None) -> ClusterInfo:
    """Validate ``TF_CONFIG`` (the environment variable unless ``text`` is given) for multi-worker training.

    Raises :class:`TFConfigError` (a ValueError) naming the problem when it is missing, not JSON, or lacks
    ``cluster.worker`` (a list of ``host:port``) or a ``task`` (``type`` "worker" or "chief", ``index``
    within its list).
    """
    if text is None:
        text = os.environ.get("TF_CONFIG")
    hint = f"set TF_CONFIG on every worker, e.g. {_EXAMPLE}"
    if text is None or not str(text).strip():
        raise TFConfigError(f"TF_CONFIG is not set; train.strategy=multiworker needs it: {hint}.")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise TFConfigError(f"TF_CONFIG is not valid JSON ({error}); {hint}.") from error
    if not isinstance(info, dict):
        raise TFConfigError(f"TF_CONFIG must be a JSON object, got {type(info).__name__}; {hint}.")
    cluster = info.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise TFConfigError(f'TF_CONFIG has no "cluster" object; {hint}.')
    unknown = sorted(set(cluster) - set(TASK_TYPES))
    if unknown:
        raise TFConfigError(
            f"TF_CONFIG cluster has {unknown[0]!r} tasks; multi-worker training takes only "
            f'"worker" (and an optional "chief") tasks.'
        )
    lists = {}
    for kind in TASK_TYPES:
        addresses = cluster.get(kind, [])
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and a.rpartition(":")[0] and a.rpartition(":")[2].isdigit() for a in addresses
        ):
            raise TFConfigError(
                f'TF_CONFIG cluster.{kind} must be a list of "host:port" strings, got {addresses!r}.'
            )
        lists[kind] = tuple(addresses)
    if not lists["worker"]:
        raise TFConfigError(f"TF_CONFIG cluster.worker lists no worker; {hint}.")
    if len(lists["chief"]) > 1:
        raise TFConfigError(f"TF_CONFIG cluster.chief must hold one address, got {len(lists['chief'])}.")
    everyone = lists["chief"] + lists["worker"]
    if len(set(everyone)) != len(everyone):
        raise TFConfigError(f"TF_CONFIG lists an address twice: {list(everyone)}.")
    task = info.get("task")
    if not isinstance(task, dict):
        raise TFConfigError(f'TF_CONFIG has no "task" object (this process\'s type and index); {hint}.')
    kind, index = task.get("type"), task.get("index", 0 if task.get("type") == "chief" else None)
    if kind not in TASK_TYPES or not lists[kind]:
        known = [k for k in TASK_TYPES if lists[k]]
        raise TFConfigError(f"TF_CONFIG task.type is {kind!r}; expected one of {known}.")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(lists[kind]):
        raise TFConfigError(
            f"TF_CONFIG task.index is {index!r}; expected an integer in [0, {len(lists[kind])}) for "
            f"the {len(lists[kind])} {kind} task(s)."
        )
    return ClusterInfo(chief=lists["chief"], workers=lists["worker"], task_type=kind, task_index=index)


# --------------------------------------------------------------------------------------------- helpers
def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of ``model``, nested models included."""
    import keras

    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
        stack.extend(getattr(layer, "_layers", []) or [])
    return found


def synchronize_batch_norm(model, enabled: bool = True) -> int:
    """Set ``synchronized`` on every BatchNormalization layer (TensorFlow backend); returns how many."""
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.synchronized = bool(enabled)
    return len(layers)


@contextlib.contextmanager
def _plain_batch_norm(model):
    """Save models with ``synchronized=False``: the flag is TensorFlow-only (other backends refuse it)."""
    layers = [layer for layer in batch_norm_layers(model) if layer.synchronized]
    for layer in layers:
        layer.synchronized = False
    try:
        yield
    finally:
        for layer in layers:
            layer.synchronized = True


def _usable_training_rows(manifest: dict, outputs) -> int:
    """Training rows :func:`c3ae.data.make_dataset` keeps for these outputs, from the shards' labels."""
    from c3ae.data import _readable_shards, age_to_group, label_to_group
    from c3ae.preprocessing.shards import read_shard

    need_group = "age_group" in outputs
    need_age = any(name in ("age", "age_bins") for name in outputs)
    total = 0
    for path in _readable_shards(manifest, "train"):
        table = read_shard(path, ["age", "label"] if need_group else ["age"])
        ages = np.asarray(table.column("age").to_numpy(zero_copy_only=False), dtype=np.float64)
        if need_group:
            labels = table.column("label").to_pylist()
            pairs = zip(labels, ages, strict=True)
            total += sum(label_to_group(label) >= 0 or age_to_group(age) >= 0 for label, age in pairs)
        elif need_age:
            total += int(np.isfinite(ages).sum())
        else:
            total += len(ages)
    return total


def _as_dict(outputs, names) -> dict:
    if isinstance(outputs, dict):
        return outputs
    if isinstance(outputs, (list, tuple)):
        return dict(zip(names, outputs, strict=True))
    return {names[0]: outputs}


# ------------------------------------------------------------------------------------------- the run
def train_multiworker(config: Config, out: str | Path) -> dict:
    """Train ``config`` into ``out`` as one worker of the cluster in ``TF_CONFIG``; returns the summary.

    Every worker returns the same summary but for ``worker_index`` and timings (the chief writes it to
    ``summary.json``). See the module docstring for how data, batch normalisation, checkpoints and resuming
    work. Raises :class:`TFConfigError` for a missing or malformed ``TF_CONFIG``, ``ConfigError`` /
    ``TrainingError`` like :func:`c3ae.train.train`.
    """
    summary, _model = fit_multiworker(config, out)
    return summary


def fit_multiworker(config: Config, out: str | Path):
    """:func:`train_multiworker`, returning ``(summary, model)``; the model holds this worker's weights."""
    from c3ae.data import read_manifest, split_size

    cluster = parse_tf_config()
    if not config.data.manifest:
        raise ConfigError("data.manifest is empty; set it to a manifest.json from 'c3ae preprocess'.")
    manifest = read_manifest(config.data.manifest)
    if split_size(manifest, "train") == 0:
        raise TrainingError(f"Manifest {config.data.manifest} has no training rows.")

    import tensorflow as tf

    try:  # before any other TensorFlow op: the strategy configures the eager context's collective ops
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:  # "Collective ops must be configured at program startup"
        raise TrainingError(
            f"Cannot start MultiWorkerMirroredStrategy ({error}): train.strategy=multiworker must run before "
            "any other TensorFlow operation in the process."
        ) from error
    run = _MultiWorkerRun(config, Path(out), cluster, strategy, manifest)
    try:
        return run.fit(), run.model
    finally:
        run.close()


class _MultiWorkerRun:
    """One worker's share of a multi-worker run: model, data, steps, collectives and the epoch loop."""

    def __init__(self, config: Config, out: Path, cluster: ClusterInfo, strategy, manifest: dict):
        import keras
        import tensorflow as tf

        from c3ae.data import split_size

        self.config, self.out, self.cluster = config, out, cluster
        self.strategy, self.manifest = strategy, manifest
        self.is_chief = cluster.is_chief
        self.has_val = split_size(manifest, "val") > 0
        self.write_dir: Path | None = None
        self.writer = None
        if self.is_chief:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(config, out / "config.yaml")
        keras.utils.set_random_seed(config.train.seed)
        known = checked_training_ages(manifest)

        self.num_workers = cluster.num_workers
        self.replicas = int(strategy.num_replicas_in_sync)
        self.local_replicas = max(self.replicas // self.num_workers, 1)
        self.per_worker_batch = int(config.data.batch_size)
        self.global_batch = self.per_worker_batch * self.num_workers
        if self.global_batch % self.replicas:
            raise ConfigError(
                f"data.batch_size {self.per_worker_batch} x {self.num_workers} workers does not split over "
                f"{self.replicas} replicas; use a per-worker batch divisible by one worker's devices."
            )

        with strategy.scope():
            self.model = model = build_model(config)
            self.synchronized = synchronize_batch_norm(model)
            self.loss, self.loss_weights = losses_for(model, config, known)
            self.optimizer = keras.optimizers.Adam(config.train.lr)
            # Compiled only so that the saved .keras files carry the same training config as `c3ae train`'s.
            model.compile(optimizer=self.optimizer, loss=self.loss, loss_weights=self.loss_weights)
            self.optimizer.build(model.trainable_variables)
            self.epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.names = list(model.output_names)
        self.per_example = per_example_losses(self.loss)
        self.metrics = metrics_for(model)  # outside the scope: only their (additive) states are used
        self.metric_keys = [
            f"{name}/{metric.name}/{index}"
            for name in self.names
            for metric in self.metrics.get(name, [])
            for index in range(len(metric.variables))
        ]
        usable = _usable_training_rows(manifest, self.names)
        if usable < self.num_workers:
            raise TrainingError(f"{usable} usable training rows cannot feed {self.num_workers} workers.")
        self.steps = int(config.train.steps_per_epoch or math.ceil(usable / self.global_batch))

        self._all_sum = tf.function(
            lambda x: strategy.run(self._all_sum_replica, args=(x,)), reduce_retracing=True
        )
        self._train_step = tf.function(self._train_step_fn)
        self._eval_step = tf.function(self._eval_step_fn, reduce_retracing=True)

    # ---------------------------------------------------------------------- collectives on host values
    def _all_sum_replica(self, x):
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group % self.local_replicas, 0)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(first, x, tf.zeros_like(x)))

    def all_sum(self, values) -> np.ndarray:
        """Sum of a float vector over the workers (every worker must call it, with the same length)."""
        import tensorflow as tf

        result = self._all_sum(tf.constant(np.asarray(values, dtype=np.float64).reshape(-1)))
        return self.strategy.experimental_local_results(result)[0].numpy()

    def broadcast_from_chief(self, variables) -> None:
        """Give every worker the chief's values of ``variables`` (after restores that may differ).

        One all-reduce of the flattened values (float64: exact for float32 and for step counters), in which
        every worker but the chief contributes zeros.
        """
        values = [np.asarray(variable.numpy()) for variable in variables]
        flat = np.concatenate([value.astype(np.float64).ravel() for value in values])
        flat = self.all_sum(flat if self.is_chief else np.zeros_like(flat))
        offset = 0
        for variable, value in zip(variables, values, strict=True):
            variable.assign(flat[offset : offset + value.size].reshape(value.shape).astype(value.dtype))
            offset += value.size

    # ---------------------------------------------------------------------------------- resume
    def restore(self) -> int:
        """Restore ``backup/`` (where this worker sees it), align every worker on the chief; the epoch."""
        import keras
        import tensorflow as tf

        backup = self.out / BACKUP_DIR
        if self.is_chief:
            self.write_dir = backup
        else:  # the TF recipe: other workers save too (collectives), to a folder they then delete
            self.write_dir = Path(tempfile.mkdtemp(prefix=f"c3ae-worker{self.cluster.worker_index}-"))
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, epoch=self.epoch_counter
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.write_dir), max_to_keep=1)
        latest = tf.train.latest_checkpoint(str(backup)) if backup.is_dir() else None
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        if self.all_sum([1.0 if latest else 0.0])[0] > 0:
            unwrap = lambda v: v.value if isinstance(v, keras.Variable) else v
            state = [unwrap(v) for v in [*self.model.variables, *self.optimizer.variables]]
            self.broadcast_from_chief([*state, self.epoch_counter])
        return int(self.epoch_counter.numpy())

    def check_agreement(self, initial_epoch: int) -> None:
        """Stop before the first step (instead of hanging in it) when the workers' runs differ."""
        settings = [
            self.steps,
            self.config.train.epochs,
            self.global_batch,
            initial_epoch,
            float(self.has_val),
            len(self.model.trainable_variables),
        ]
        expected = np.asarray(settings, dtype=np.float64) * self.num_workers
        if not np.array_equal(self.all_sum(settings), expected):
            raise TrainingError(
                "Workers disagree on the run (steps per epoch, epochs, global batch, resume epoch, val "
                f"split, trainable tensors = {settings} on worker {self.cluster.worker_index}); give "
                "every worker the same config and manifest."
            )

    # ------------------------------------------------------------------------------------ data
    def _common(self) -> dict:
        return {
            "model": self.config.model.name,
            "batch_size": self.per_worker_batch,
            "outputs": self.names,
            "input_size": self.config.data.input_size,
            "cache": self.config.data.cache,
            "label_weights": True,
        }

    def _unwrap(self, dataset):
        return unwrap_single_input(dataset, self.model)

    def train_dataset(self, initial_epoch: int):
        import tensorflow as tf

        from c3ae.data import make_dataset

        def dataset_fn(context: tf.distribute.InputContext):
            # The same seeded row stream on every worker, each keeping its own rows; a resumed run shifts
            # the seed so that it does not replay the first epochs' order.
            dataset = make_dataset(
                self.manifest,
                split="train",
                augment=self.config.data.augment,
                seed=self.config.train.seed + initial_epoch,
                **self._common(),
            )
            dataset = dataset.repeat().unbatch()
            dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
            batch = context.get_per_replica_batch_size(self.global_batch)
            return self._unwrap(dataset.batch(batch, drop_remainder=True)).prefetch(tf.data.AUTOTUNE)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def val_dataset(self):
        """This worker's share of the validation rows, not repeated (no collective per batch)."""
        import tensorflow as tf

        from c3ae.data import make_dataset

        dataset = make_dataset(self.manifest, split="val", augment=False, **self._common()).unbatch()
        dataset = dataset.shard(self.num_workers, self.cluster.worker_index).batch(self.per_worker_batch)
        return self._unwrap(dataset).prefetch(tf.data.AUTOTUNE)

    # ----------------------------------------------------------------------------------- steps
    def _batch_terms(self, targets, predictions, weights, in_replica: bool):
        """Loss and metric terms of a local batch, from the task's loss and metric objects.

        An output's loss sums its per-example values (weighted: unknown labels weigh 0) over its labelled
        rows (weight > 0). ``in_replica`` (training): returns this replica's share of the global-batch
        loss, ``sum / labelled rows of all replicas`` per output (the global batch where every row is
        labelled, as ``tf.nn.compute_average_loss``) plus 1 / replicas of the regularisation, so that the
        sum over replicas is ``fit``'s loss of the global batch (``c3ae.task.mean_over_labelled``). Always
        returns the metric states; for evaluation also per-output loss ``(sum, count)`` to reduce.
        """
        import tensorflow as tf

        predictions = _as_dict(predictions, self.names)
        sums, parts, counts = {}, [], []
        for name in self.names:
            y_true, y_pred, weight = targets[name], predictions[name], weights[name]
            parts.append(tf.reduce_sum(self.per_example[name](y_true, y_pred, sample_weight=weight)))
            counts.append(tf.reduce_sum(tf.cast(weight > 0, tf.float32)))
            sums.update(self._metric_states(name, y_true, y_pred))
        if not in_replica:
            for name, part, count in zip(self.names, parts, counts, strict=True):
                sums[f"loss_sum/{name}"], sums[f"loss_count/{name}"] = part, count
            return None, sums
        context = tf.distribute.get_replica_context()
        labelled = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(tf.stack(counts)))
        total = tf.constant(0.0)
        for index, name in enumerate(self.names):
            term = tf.math.divide_no_nan(tf.cast(parts[index], tf.float32), labelled[index])
            total += float(self.loss_weights[name]) * term
        return total + tf.nn.scale_regularization_loss(self._regularization()), sums

    def _metric_states(self, name: str, y_true, y_pred) -> dict:
        """The states (totals and counts) output ``name``'s metrics reach from zero on this batch: sums
        over batches and workers give the states of one pass over all their rows."""
        import tensorflow as tf

        states = {}
        for metric in self.metrics.get(name, []):
            zeros = [tf.zeros(variable.shape, variable.dtype) for variable in metric.variables]
            for index, value in enumerate(metric.stateless_update_state(zeros, y_true, y_pred)):
                states[f"{name}/{metric.name}/{index}"] = value
        return states

    def _regularization(self):
        import tensorflow as tf

        losses = self.model.losses
        return tf.add_n([tf.cast(v, tf.float32) for v in losses]) if losses else tf.constant(0.0)

    def _train_step_fn(self, iterator):
        import tensorflow as tf

        def replica_fn(inputs, targets, weights):
            with tf.GradientTape() as tape:
                predictions = self.model(inputs, training=True)
                total, sums = self._batch_terms(targets, predictions, weights, in_replica=True)
            variables = self.model.trainable_variables
            gradients = tape.gradient(total, variables)
            # Keras 3's optimizer all-reduces (sums) the gradients over the replicas in replica context.
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
            return total, sums

        total, sums = self.strategy.run(replica_fn, args=next(iterator))
        reduce = lambda value: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
        return reduce(total), {key: reduce(value) for key, value in sums.items()}

    def _eval_step_fn(self, inputs, targets, weights):
        predictions = self.model(inputs, training=False)
        return self._batch_terms(targets, predictions, weights, in_replica=False)[1]

    def _metrics(self, sums: dict, prefix: str) -> dict:
        """The metrics' results from summed states, named as ``fit`` logs them (``mae``/``acc`` for one
        output, ``age_mae``... for several)."""
        single = len(self.names) == 1
        logs = {}
        for name in self.names:
            for metric in self.metrics.get(name, []):
                state = [np.float32(sums[f"{name}/{metric.name}/{i}"]) for i in range(len(metric.variables))]
                key = metric.name if single else f"{name}_{metric.name}"
                logs[prefix + key] = float(metric.stateless_result(state))
        return logs

    def evaluate(self, val_data) -> dict:
        """Validation loss and metrics over every worker's share, summed once at the end."""
        keys = sorted(
            [f"loss_{part}/{n}" for n in self.names for part in ("sum", "count")] + self.metric_keys
        )
        local = dict.fromkeys(keys, 0.0)
        for inputs, targets, weights in val_data:
            for key, value in self._eval_step(inputs, targets, weights).items():
                local[key] += float(value)
        totals = dict(zip(keys, self.all_sum([local[k] for k in keys]), strict=True))
        val_loss = float(self._regularization())
        for name in self.names:
            count = totals[f"loss_count/{name}"]
            mean = totals[f"loss_sum/{name}"] / count if count else 0.0
            val_loss += float(self.loss_weights[name]) * mean
        return {"val_loss": val_loss, **self._metrics(totals, "val_")}

    # ---------------------------------------------------------------------------------- epochs
    def fit(self) -> dict:
        import keras
        import tensorflow as tf

        config = self.config
        initial_epoch = self.restore()
        self.check_agreement(initial_epoch)
        if self.is_chief:
            logger.info(
                "multiworker: %d workers, %d replicas, global batch %d, %d steps/epoch, %d synchronized "
                "BatchNormalization layers, starting at epoch %d",
                self.num_workers,
                self.replicas,
                self.global_batch,
                self.steps,
                self.synchronized,
                initial_epoch + 1,
            )
        monitor, mode = monitored_metric(self.model, validation=self.has_val)
        # The chief ends each epoch as fit does (time, last/best.keras, log.csv, early stopping).
        callbacks = keras.callbacks.CallbackList(
            epoch_callbacks(config, self.out, monitor, mode) if self.is_chief else [], model=self.model
        )
        if self.is_chief:
            self.writer = tf.summary.create_file_writer(str(self.out / "tensorboard"))
        val_data = self.val_dataset() if self.has_val else None
        iterator = iter(self.train_dataset(initial_epoch))
        schedule = learning_rate_schedule(config)
        history: list[dict] = []
        stopped = None
        started = time.monotonic()
        self.model.stop_training = False
        callbacks.on_train_begin()
        try:
            for epoch in range(initial_epoch, config.train.epochs):
                callbacks.on_epoch_begin(epoch)
                logs, stopped = self._train_epoch(epoch, iterator, float(schedule(epoch)))
                if stopped:  # like TerminateOnNaN; this epoch is not saved, the last good files stay
                    logger.warning("multiworker: %s; stopping, the last good checkpoints stay", stopped)
                    break
                if val_data is not None:
                    logs.update(self.evaluate(val_data))
                self.epoch_counter.assign(epoch + 1)
                self.manager.save()  # every worker: saving may run collectives
                if not self.is_chief:
                    shutil.rmtree(self.write_dir, ignore_errors=True)
                history.append({"epoch": epoch, **logs})
                if self.is_chief:
                    self._chief_epoch_end(epoch, logs, callbacks)
                # The values are all-reduced, so workers agree anyway; the chief's decision is shared.
                if self.all_sum([float(bool(self.model.stop_training))])[0] > 0:
                    stopped = f"early stopping: no better {monitor} in {config.train.early_stopping} epochs"
                    break
        finally:
            callbacks.on_train_end()
        elapsed = time.monotonic() - started
        return self._summary(history, monitor, stopped, initial_epoch, elapsed)

    def _train_epoch(self, epoch: int, iterator, learning_rate: float) -> tuple[dict | None, str | None]:
        """One epoch's steps: (logs, None), or (None, why) when a step's loss is not finite."""
        self.optimizer.learning_rate = learning_rate
        loss_sum, sums = 0.0, {}
        for _ in range(self.steps):
            step_loss, step_sums = self._train_step(iterator)
            step_loss = float(step_loss)  # all-reduced: every worker sees the same value
            if not math.isfinite(step_loss):
                return None, f"non-finite loss {step_loss} in epoch {epoch + 1}"
            loss_sum += step_loss
            for key, value in step_sums.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        logs = {"loss": loss_sum / self.steps, **self._metrics(sums, ""), "learning_rate": learning_rate}
        return logs, None

    def _chief_epoch_end(self, epoch: int, logs: dict, callbacks) -> None:
        import tensorflow as tf

        with _plain_batch_norm(self.model):
            callbacks.on_epoch_end(epoch, dict(logs))  # a copy: the timer adds epoch_seconds for log.csv
        with self.writer.as_default(step=epoch):
            for key, value in logs.items():
                tf.summary.scalar(key, value)
        self.writer.flush()
        if self.config.train.verbose != 0:  # None (the default): one line per epoch, as fit in a log
            shown = " - ".join(f"{key}: {value:.4g}" for key, value in logs.items())
            logger.info("Epoch %d/%d - %s", epoch + 1, self.config.train.epochs, shown)

    def _summary(self, history, monitor: str, stopped, initial_epoch: int, elapsed: float) -> dict:
        out = self.out
        best = None
        if self.is_chief and (out / "best.keras").is_file() and (out / "best.json").is_file():
            best = json.loads((out / "best.json").read_text())
        shared = self.all_sum([1.0, best["epoch"], best["value"]] if best else [0.0, 0.0, 0.0])
        if shared[0] == 0:
            raise TrainingError(
                f"No finite {monitor} was reached; nothing was saved (see {out / 'log.csv'})."
            )
        if best is None:
            best = {"epoch": int(shared[1]), "metric": monitor, "value": float(shared[2])}
        summary = {
            "family": self.config.model.name,
            "parameters": int(self.model.count_params()),
            "epochs_run": len(history),
            "best": best,
            "train_seconds_this_run": round(elapsed, 1),
            "final": {k: float(v) for k, v in history[-1].items() if k != "epoch"} if history else {},
            "strategy": "multiworker",
            "num_workers": self.num_workers,
            "worker_index": self.cluster.worker_index,
            "global_batch_size": self.global_batch,
            "steps_per_epoch": self.steps,
            "initial_epoch": initial_epoch,
            "synchronized_batch_norm_layers": self.synchronized,
            "stopped": stopped,
        }
        if self.is_chief:
            plot_curves(out / "log.csv", out / "curves.png")
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if not self.is_chief and self.write_dir is not None:
            shutil.rmtree(self.write_dir, ignore_errors=True)
