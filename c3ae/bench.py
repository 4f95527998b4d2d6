"""Throughput benchmarks: the input pipeline (with augmentation) and the training step, in images per second.

``c3ae bench data --data MANIFEST`` calls :func:`bench_data` and :func:`bench_train_step` and prints
:func:`format_bench_table`. Both return plain dicts of numbers and strings.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _onednn() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on (its default on x86 Linux); off, CPU training is
    about 2.5 times slower."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "no", "off")


def _rates(sizes: Sequence[int], seconds: Sequence[float]) -> dict:
    per_batch = [n / max(t, 1e-9) for n, t in zip(sizes, seconds, strict=True)]
    total = max(sum(seconds), 1e-9)
    return {
        "images_per_s_median": float(statistics.median(per_batch)),
        "images_per_s_overall": float(sum(sizes) / total),
        "seconds": float(total),
        "images": int(sum(sizes)),
    }


def bench_data(
    manifest: str | Path,
    model: str = "c3ae",
    batch_size: int = 64,
    batches: int = 30,
    warmup: int = 5,
    augment: bool = True,
    split: str = "train",
    progress: bool = True,
) -> dict:
    """Images per second of :func:`c3ae.data.make_dataset` (shuffled, augmented by default) on this machine.

    The split is repeated, so a small one still gives ``batches`` timed batches after ``warmup`` untimed
    ones. Returns the median over batches of the per-batch rate and the overall rate.
    """
    from tqdm.auto import tqdm

    from c3ae.data import make_dataset

    if batches < 1 or warmup < 0:
        raise ValueError(f"Need batches >= 1 and warmup >= 0, got {batches} and {warmup}.")
    dataset = make_dataset(
        manifest, split=split, model=model, batch_size=batch_size, augment=augment, seed=0
    ).repeat()
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    sizes, seconds = [], []
    for _ in tqdm(range(batches), desc=f"data {model}", unit="batch", disable=not progress, leave=False):
        start = time.perf_counter()
        inputs, _ = next(iterator)
        seconds.append(time.perf_counter() - start)
        sizes.append(int(next(iter(inputs.values())).shape[0]))
    return {
        "bench": "data",
        "model": str(model),
        "augment": bool(augment),
        "batch_size": int(batch_size),
        "batches": int(batches),
        "cpus": _cpu_count(),
        "onednn": _onednn(),
        **_rates(sizes, seconds),
    }


def _random_batch(model, batch_size: int, rng) -> tuple[object, dict]:
    import numpy as np

    from c3ae.losses import two_point_encode

    def pixels(tensor):
        return rng.uniform(0, 255, (batch_size, *tensor.shape[1:])).astype(np.float32)

    if isinstance(model.input, dict):
        inputs = {name: pixels(tensor) for name, tensor in model.input.items()}
    else:
        inputs = pixels(model.inputs[0])
    ages = rng.uniform(1, 90, batch_size).astype(np.float32)
    targets = {}
    for name, output in zip(model.output_names, model.outputs, strict=True):
        width = int(output.shape[-1])
        if name == "age" or (name == "age_bins" and width == 1):
            targets[name] = ages.reshape(-1, 1)
        elif name == "age_bins" and width == 12:
            targets[name] = np.asarray(two_point_encode(ages), dtype=np.float32)
        elif name == "gender":
            targets[name] = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)
        else:  # a distribution over classes (age_group, other bin layouts)
            targets[name] = np.eye(width, dtype=np.float32)[rng.integers(0, width, batch_size)]
    return inputs, targets


def _simple_losses(model) -> dict:
    import keras

    losses = {}
    for name in model.output_names:
        if name == "age":
            losses[name] = keras.losses.MeanAbsoluteError()
        elif name == "gender":
            losses[name] = keras.losses.BinaryCrossentropy()
        elif name == "age_bins":
            losses[name] = keras.losses.KLDivergence()
        else:
            losses[name] = keras.losses.CategoricalCrossentropy()
    return losses


def bench_train_step(
    model_name: str = "c3ae-se-gender",
    batch_size: int = 64,
    steps: int = 20,
    warmup: int = 3,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Images per second of one ``train_on_batch`` of a registered model variant on random data.

    Compiled with Adam and simple losses (MAE on ``age``, KL divergence on ``age_bins``, binary
    cross-entropy on ``gender``, categorical cross-entropy on class outputs). The first ``warmup`` steps
    (graph tracing) are not timed. Returns the median per-step rate and the overall rate.
    """
    import keras
    import numpy as np
    from tqdm.auto import tqdm

    from c3ae.models import build_variant

    if steps < 1 or warmup < 0:
        raise ValueError(f"Need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
    model = build_variant(model_name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_simple_losses(model))
    inputs, targets = _random_batch(model, int(batch_size), np.random.default_rng(seed))
    for _ in range(warmup):
        model.train_on_batch(inputs, targets)
    seconds = []
    for _ in tqdm(range(steps), desc=f"train {model_name}", unit="step", disable=not progress, leave=False):
        start = time.perf_counter()
        model.train_on_batch(inputs, targets)
        seconds.append(time.perf_counter() - start)
    return {
        "bench": "train_step",
        "model": str(model_name),
        "batch_size": int(batch_size),
        "steps": int(steps),
        "parameters": int(model.count_params()),
        "cpus": _cpu_count(),
        "onednn": _onednn(),
        **_rates([int(batch_size)] * len(seconds), seconds),
    }


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return "" if value is None else str(value).replace("|", "\\|")


def format_bench_table(rows: Sequence[Mapping]) -> str:
    """A markdown table of benchmark results: one row per dict, columns in first-seen key order."""
    rows = list(rows)
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("bench", "model") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
