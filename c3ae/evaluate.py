"""``c3ae evaluate``: a model on one split of a preprocessed dataset: MAE, CA(3), CA(5), gender accuracy,
MAE per age band, and a one-page PNG report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from c3ae.conventions import AGE_BANDS
from c3ae.metrics import (
    cumulative_accuracy,
    gender_accuracy,
    gender_accuracy_by_band,
    gender_accuracy_by_gender,
    gender_calibration_error,
    mae,
    mae_by_band,
)
from c3ae.models.base import model_info


def predict_split(
    model: keras.Model,
    manifest,
    split: str = "test",
    batch_size: int = 256,
    context: float = 0.0,
    flip: bool = False,
) -> dict:
    """Predictions and labels over a split: ``age_true``, ``age_pred``, ``gender_true``, ``gender_prob``.

    ``context``: the visible window the model was trained with (``c3ae.bundled.trained_context``).
    ``flip``: average each prediction with that of the mirrored crops (test-time augmentation)."""
    from c3ae.data import make_dataset

    # Labels for both tasks, except for a gender-only model: asking for ages would drop rows without one.
    targets = ["gender"] if model.output_names == ["gender"] else ["age", "gender"]
    info = model_info(model)
    dataset = make_dataset(
        manifest,
        split=split,
        model=dataclasses.replace(info, outputs=tuple(targets)),
        batch_size=batch_size,
        augment=False,
        shuffle=False,
        context=context,
    )
    single = not isinstance(model.input, dict)
    collected: dict[str, list] = {"age_true": [], "age_pred": [], "gender_true": [], "gender_prob": []}
    for inputs, labels in dataset:
        feed = inputs[model.inputs[0].name] if single else inputs
        outputs = _outputs(model, feed)
        if flip:
            mirrored = _outputs(model, keras.tree.map_structure(lambda crops: crops[:, :, ::-1], feed))
            outputs = {name: (outputs[name] + mirrored[name]) / 2 for name in outputs}
        if "age" in labels:
            collected["age_true"].append(np.asarray(labels["age"]).reshape(-1))
        if "gender" in labels:
            collected["gender_true"].append(np.asarray(labels["gender"]).reshape(-1))
        if "age" in outputs:
            collected["age_pred"].append(outputs["age"].reshape(-1))
        if "gender" in outputs:
            collected["gender_prob"].append(outputs["gender"].reshape(-1))
    return {k: np.concatenate(v).astype(np.float64) if v else None for k, v in collected.items()}


def _outputs(model: keras.Model, feed) -> dict[str, np.ndarray]:
    # predict_on_batch runs the traced graph (traced once per batch shape): twice as fast as an eager call
    # on a CPU, with the same numbers.
    outputs = model.predict_on_batch(feed)
    outputs = outputs if isinstance(outputs, dict) else {model.output_names[0]: outputs}
    return {name: keras.ops.convert_to_numpy(value).astype(np.float64) for name, value in outputs.items()}


def metrics_from_predictions(predictions: dict) -> dict:
    """The evaluation JSON: ``mae``, ``ca3``, ``ca5``, ``gender_accuracy``, ``mae_by_band``, ``count``, and
    ``gender_accuracy_by_band`` for models with a gender output evaluated on rows with ages."""
    age_true, age_pred = predictions.get("age_true"), predictions.get("age_pred")
    gender_true, gender_prob = predictions.get("gender_true"), predictions.get("gender_prob")
    has_age = age_true is not None and age_pred is not None
    count = len(age_true) if age_true is not None else len(gender_true)
    return {
        "mae": mae(age_true, age_pred) if has_age else None,
        "ca3": cumulative_accuracy(age_true, age_pred, 3) if has_age else None,
        "ca5": cumulative_accuracy(age_true, age_pred, 5) if has_age else None,
        "gender_accuracy": gender_accuracy(gender_true, gender_prob) if gender_prob is not None else None,
        "gender_ece": gender_calibration_error(gender_true, gender_prob) if gender_prob is not None else None,
        "mae_by_band": mae_by_band(age_true, age_pred) if has_age else None,
        "count": int(count),
        **(
            {"gender_accuracy_by_band": gender_accuracy_by_band(age_true, gender_true, gender_prob)}
            if gender_prob is not None and age_true is not None and len(age_true) == len(gender_true)
            else {}
        ),
        **(
            {"gender_accuracy_by_gender": gender_accuracy_by_gender(gender_true, gender_prob)}
            if gender_prob is not None
            else {}
        ),
    }


def evaluate(model: keras.Model, manifest, split: str = "test", **options) -> tuple[dict, dict]:
    """(metrics, predictions) of ``model`` on ``split``; ``options`` are :func:`predict_split`'s
    (``batch_size``, ``context`` the model was trained with, ``flip`` for test-time mirroring)."""
    predictions = predict_split(model, manifest, split, **options)
    return metrics_from_predictions(predictions), predictions


MEAN_KEYS = ("mae", "ca3", "ca5", "gender_accuracy")


def mean_over_sources(per_source: dict[str, dict]) -> dict:
    """The unweighted mean over sources of each headline metric (None where no source has it), so that a
    small source counts as much as a large one."""
    mean = {}
    for key in MEAN_KEYS:
        values = [m[key] for m in per_source.values() if m.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    return mean


def evaluate_sources(
    model: keras.Model, sources: Sequence[tuple[str, object]], split: str = "test", **options
) -> tuple[dict, dict]:
    """``({"sources": {name: metrics}, "mean": {...}}, {name: predictions})`` over (name, manifest) pairs:
    every source evaluated apart, as the model cards report them (``options`` as :func:`evaluate`'s)."""
    per_source, predictions = {}, {}
    for name, manifest in sources:
        per_source[name], predictions[name] = evaluate(model, manifest, split, **options)
    return {"sources": per_source, "mean": mean_over_sources(per_source)}, predictions


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines, the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    aligned = [
        [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        for row in rows
    ]
    return ["  ".join(cells) for cells in aligned]


def format_metrics(metrics: dict, title: str = "") -> str:
    """The evaluation (one source's metrics, or ``{"sources": ..., "mean": ...}`` of
    :func:`evaluate_sources`) as tables for a terminal: per source (MAE in years, CA(3), CA(5), gender
    accuracy), then MAE per true-age band, gender accuracy per band and per true gender, with face
    counts. ``c3ae evaluate --json`` writes the full numbers."""
    per_source = metrics["sources"] if "sources" in metrics else {"": metrics}
    names = list(per_source)
    lines = [title] if title else []
    header = ["source" if len(names) > 1 else "", "faces", "MAE (years)", "CA(3)", "CA(5)", "gender acc."]
    rows = [header]
    for name, m in per_source.items():
        rows.append(
            [
                name or "all",
                str(m.get("count", "-")),
                _cell(m.get("mae"), 2),
                _cell(m.get("ca3"), 3),
                _cell(m.get("ca5"), 3),
                _cell(m.get("gender_accuracy"), 3),
            ]
        )
    if "mean" in metrics:
        mean = metrics["mean"]
        row = ["mean of sources", ""]
        headline = (("mae", 2), ("ca3", 3), ("ca5", 3), ("gender_accuracy", 3))
        row += [_cell(mean.get(key), digits) for key, digits in headline]
        rows.append(row)
    lines += _columns(rows)
    sections = (
        ("mae_by_band", "MAE per true age band, years (faces)", "mae", 2, "band"),
        ("gender_accuracy_by_band", "gender accuracy per true age band (faces)", "accuracy", 3, "band"),
        ("gender_accuracy_by_gender", "gender accuracy per true gender (faces)", "accuracy", 3, "gender"),
    )
    for key, heading, field, digits, first in sections:
        tables = {name: m.get(key) for name, m in per_source.items() if m.get(key)}
        if not tables:
            continue
        labels = list(next(iter(tables.values())))
        rows = [[first, *(name or "all" for name in tables)]]
        for label in labels:
            cells = []
            for table in tables.values():
                entry = table.get(label) or {}
                cells.append(f"{_cell(entry.get(field), digits)} ({entry.get('count', 0)})")
            rows.append([label, *cells])
        lines += ["", heading, *_columns(rows)]
    return "\n".join(lines)


def write_report(metrics: dict, predictions: dict, png: str | Path, title: str = "") -> None:
    """One page: predicted vs true age, MAE per band, the CA(n) curve, the gender confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 9))
    age_true, age_pred = predictions.get("age_true"), predictions.get("age_pred")
    if age_true is not None and age_pred is not None:
        axis = axes[0, 0]
        axis.scatter(age_true, age_pred, s=4, alpha=0.35)
        top = float(max(age_true.max(), age_pred.max(), 1.0))
        axis.plot([0, top], [0, top], "k--", linewidth=1)
        axis.set(
            xlabel="true age (years)", ylabel="predicted age (years)", title=f"MAE {metrics['mae']:.2f} years"
        )
        bands = metrics["mae_by_band"]
        labels = [label for label, *_ in AGE_BANDS]
        values = [bands[label]["mae"] or 0.0 for label in labels]
        axes[0, 1].bar(labels, values, color="tab:orange")
        for i, label in enumerate(labels):
            axes[0, 1].text(i, values[i], f"n={bands[label]['count']}", ha="center", va="bottom", fontsize=8)
        axes[0, 1].set(xlabel="true age band (years)", ylabel="MAE (years)", title="MAE per age band")
        errors = np.abs(age_pred - age_true)
        ns = np.arange(0, 21)
        axes[1, 0].plot(ns, [(errors <= n).mean() for n in ns], marker="o", markersize=3)
        axes[1, 0].set(
            xlabel="n (years)",
            ylabel="CA(n) = share with |error| <= n",
            ylim=(0, 1),
            title=f"CA(3) {metrics['ca3']:.3f}, CA(5) {metrics['ca5']:.3f}",
        )
        axes[1, 0].grid(alpha=0.3)
    else:
        for axis in (axes[0, 0], axes[0, 1], axes[1, 0]):
            axis.text(0.5, 0.5, "no age output", ha="center", va="center")
    gender_true, gender_prob = predictions.get("gender_true"), predictions.get("gender_prob")
    axis = axes[1, 1]
    if gender_true is not None and gender_prob is not None:
        known = gender_true >= 0
        predicted = (gender_prob[known] >= 0.5).astype(int)
        truth = gender_true[known].astype(int)
        matrix = np.array([[np.sum((truth == t) & (predicted == p)) for p in (0, 1)] for t in (0, 1)])
        axis.imshow(matrix, cmap="Blues")
        for t in (0, 1):
            for p in (0, 1):
                axis.text(p, t, str(matrix[t, p]), ha="center", va="center")
        axis.set(
            xticks=[0, 1],
            xticklabels=["female", "male"],
            yticks=[0, 1],
            yticklabels=["female", "male"],
            xlabel="predicted",
            ylabel="true",
            title=f"gender accuracy {metrics['gender_accuracy']:.3f}",
        )
    else:
        axis.text(0.5, 0.5, "no gender output", ha="center", va="center")
    figure.suptitle(f"{title}  (n = {metrics['count']})")
    figure.tight_layout()
    from c3ae.files import atomic_path

    with atomic_path(png) as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)
