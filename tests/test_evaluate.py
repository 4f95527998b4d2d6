"""c3ae evaluate: metrics from hand-made predictions, the CLI on a small trained-from-scratch model."""

import json
import subprocess
import sys

import numpy as np
import pytest

from c3ae.bundled import ModelNotFoundError, available_models, load_model
from c3ae.evaluate import metrics_from_predictions, write_report


def test_metrics_on_hand_made_predictions():
    predictions = {
        "age_true": np.array([5.0, 15.0, 30.0, 45.0, 70.0, 80.0]),
        "age_pred": np.array([7.0, 15.0, 36.0, 41.0, 70.5, 60.0]),  # errors 2, 0, 6, 4, 0.5, 20
        "gender_true": np.array([1, 0, -1, 1, 0, 1]),
        "gender_prob": np.array(
            [0.9, 0.2, 0.7, 0.4, 0.6, 0.5]
        ),  # right, right, (unknown), wrong, wrong, right
    }
    metrics = metrics_from_predictions(predictions)
    assert metrics["mae"] == pytest.approx((2 + 0 + 6 + 4 + 0.5 + 20) / 6)
    assert metrics["ca3"] == pytest.approx(3 / 6) and metrics["ca5"] == pytest.approx(4 / 6)
    assert metrics["gender_accuracy"] == pytest.approx(3 / 5)
    assert metrics["count"] == 6
    bands = metrics["mae_by_band"]
    assert bands["0-12"] == {"mae": 2.0, "count": 1} and bands["13-19"] == {"mae": 0.0, "count": 1}
    assert bands["20-39"] == {"mae": 6.0, "count": 1} and bands["40-59"] == {"mae": 4.0, "count": 1}
    assert bands["60+"]["mae"] == pytest.approx(10.25) and bands["60+"]["count"] == 2
    assert set(metrics) == {
        "mae",
        "ca3",
        "ca5",
        "gender_accuracy",
        "mae_by_band",
        "count",
        "gender_accuracy_by_band",
        "gender_accuracy_by_gender",
        "gender_ece",
    }
    assert sum(band["count"] for band in metrics["gender_accuracy_by_band"].values()) == 5  # known labels
    # women: 0.2 right, 0.6 wrong; men: 0.9 right, 0.4 wrong, 0.5 right (>= 0.5 is male)
    assert metrics["gender_accuracy_by_gender"] == {
        "female": {"accuracy": 0.5, "count": 2},
        "male": {"accuracy": pytest.approx(2 / 3), "count": 3},
    }
    json.dumps(metrics)


def test_report_png(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 200)
    predictions = {
        "age_true": true,
        "age_pred": true + rng.normal(0, 5, 200),
        "gender_true": rng.integers(0, 2, 200).astype(float),
        "gender_prob": rng.uniform(0, 1, 200),
    }
    path = tmp_path / "report.png"
    write_report(metrics_from_predictions(predictions), predictions, path, title="test")
    assert path.stat().st_size > 20_000


def test_unknown_bundled_model_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="neither a .keras file nor a bundled model"):
        load_model("no-such-model")
    assert isinstance(available_models(), list)


def test_not_a_keras_file(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"zip? no")
    with pytest.raises(ModelNotFoundError, match="not a loadable Keras model"):
        load_model(path)


@pytest.mark.slow
def test_cli_evaluates_a_saved_model(tmp_path):
    from test_data import build_tiny_manifest

    from c3ae.models import build_c3ae

    folder = tmp_path / "shards"
    folder.mkdir()
    manifest = build_tiny_manifest(folder)["manifest"]

    model_path = tmp_path / "model.keras"
    build_c3ae(gender=True).save(model_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "c3ae.cli",
            "evaluate",
            str(model_path),
            "--data",
            str(manifest),
            "--split",
            "val",
            "--json",
            str(tmp_path / "m.json"),
            "--report",
            str(tmp_path / "r.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["count"] == 6 and metrics["gender_accuracy"] is not None
    assert "MAE (years)" in result.stdout and "MAE per true age band" in result.stdout  # tables, not JSON
    assert not result.stdout.lstrip().startswith("{")
    assert (tmp_path / "r.png").is_file()


def test_load_model_reads_the_original_h5_files(legacy_weights):
    ssrnet = load_model(legacy_weights / "ssrnet_age_imdb.h5")
    c3ae = load_model(legacy_weights / "c3ae_se_imdb_v89.h5")
    assert ssrnet.count_params() == 40_915 and c3ae.count_params() == 53_993


def test_load_model_rejects_an_unknown_h5(tmp_path):
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("dense_1")
    with pytest.raises(ModelNotFoundError, match="neither an SSR-Net nor a C3AE legacy file"):
        load_model(path)


def test_evaluation_tables_for_people():
    """``c3ae evaluate`` prints tables (per source, per age band, per gender), the JSON goes to --json."""
    from c3ae.evaluate import format_metrics, mean_over_sources

    predictions = {
        "age_true": np.array([5.0, 15.0, 30.0, 45.0, 70.0, 80.0]),
        "age_pred": np.array([7.0, 15.0, 36.0, 41.0, 70.5, 60.0]),
        "gender_true": np.array([1, 0, -1, 1, 0, 1]),
        "gender_prob": np.array([0.9, 0.2, 0.7, 0.4, 0.6, 0.5]),
    }
    one = metrics_from_predictions(predictions)
    text = format_metrics(one, "m on the val split")
    lines = text.splitlines()
    assert lines[0] == "m on the val split"
    assert lines[1].split() == ["faces", "MAE", "(years)", "CA(3)", "CA(5)", "gender", "acc."]
    assert lines[2].split() == ["all", "6", "5.42", "0.500", "0.667", "0.600"]
    assert "60+    10.25 (2)" in text and "20-39      - (0)" in text  # no known gender in that band
    assert "female  0.500 (2)" in text and "male    0.667 (3)" in text
    both = format_metrics({"sources": {"utk": one, "aaf": one}, "mean": mean_over_sources({"a": one})})
    assert "mean of sources" in both and both.splitlines()[0].split()[:2] == ["source", "faces"]
    assert "e-" not in text and "0.41666" not in both  # no 15-digit floats
