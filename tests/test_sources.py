"""Several training sources: weighted mixing, balance weights, per-source validation and evaluation,
recipes with stages. Hand-made manifests of real-face chips (the repository's assets): no detector."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from c3ae.config import ConfigError, load_config, load_stages
from c3ae.data import Source, balance_table, make_dataset, read_sources
from c3ae.faces import ChipSpec, Detection, align_face, read_image
from c3ae.preprocessing.shards import write_shard
from c3ae.train import TrainingError, train, train_stages

SPEC = ChipSpec()
# the distilled recipes need teacher labels: tests/test_distill.py trains them on labelled manifests
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if "data:\n  teacher:" not in p.read_text())


def _faces() -> list:
    """Four aligned faces from the public-domain portrait, a little apart in scale and position."""
    image = read_image(REPO / "assets" / "obama.jpg")
    faces = []
    for scale, dx in ((1.0, 0), (0.92, 12), (1.08, -12), (1.0, 20)):
        cx, cy, half = 492.0 + dx, 260.0, 150.0 * scale
        box = (cx - half, cy - half * 1.3, cx + half, cy + half * 1.3)
        points = (
            (cx - 70, cy - 40),
            (cx + 70, cy - 40),
            (cx, cy + 20),
            (cx - 55, cy + 80),
            (cx + 55, cy + 80),
        )
        faces.append(align_face(image, Detection(box, 0.99, points), SPEC))
    return faces


FACES = _faces()


def _manifest(folder: Path, dataset: str, splits: dict[str, list[tuple[float, int]]], chip=None) -> Path:
    """A manifest with one shard per split; each row (age years, gender 1/0/-1) a real-face chip."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, rows in splits.items():
        table = [
            {
                "image": FACES[i % len(FACES)].chip_jpeg,
                "age": age,
                "gender": gender,
                "boxes": FACES[i % len(FACES)].boxes,
                "single_box": FACES[i % len(FACES)].single_box,
                "landmarks": FACES[i % len(FACES)].landmarks,
                "detector_score": 0.99,
                "faces_found": 1,
                "source": dataset,
                "path": f"{split}{i}.jpg",
                "identity": f"{split}{i}",
                "label": None,
            }
            for i, (age, gender) in enumerate(rows)
        ]
        write_shard(folder / f"{split}-00000.feather", table)
        shards.append({"file": f"{split}-00000.feather", "split": split, "rows": len(table)})
    manifest = {
        "format": "c3ae-manifest",
        "version": 1,
        "dataset": dataset,
        "face_pipeline": {"detector": "mtcnn", "min_face": 20, "chip": chip or SPEC.to_dict()},
        "shards": shards,
        "counts": {},
        "rejects": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """'young': 12 training rows aged 10 (and a val/test split); 'old': 12 rows aged 60."""
    root = tmp_path_factory.mktemp("sources")
    young = [(10.0, i % 2) for i in range(12)]
    old = [(60.0, i % 2) for i in range(12)]
    return (
        _manifest(root / "young", "young", {"train": young, "val": young[:6], "test": young[:6]}),
        _manifest(root / "old", "old", {"train": old, "val": old[:6], "test": old[:6]}),
    )


def _ages(dataset, batches: int) -> np.ndarray:
    return np.concatenate([t["age"].numpy().ravel() for _, t in dataset.take(batches)])


# ----------------------------------------------------------------------------------------------- mixing
@pytest.mark.slow
def test_mixing_follows_the_weights_and_the_seed(two_sources):
    young, old = two_sources
    sources = [Source(young, 3.0), Source(old, 1.0)]
    ages = _ages(make_dataset(sources, "train", batch_size=50, seed=0, augment=False), 16)
    assert len(ages) == 800
    assert abs(np.mean(ages == 10.0) - 0.75) < 0.05  # 3 : 1 within 5 points on 800 seeded draws
    again = _ages(make_dataset(sources, "train", batch_size=50, seed=0, augment=False), 16)
    np.testing.assert_array_equal(ages, again)
    swapped = _ages(make_dataset([Source(young, 1.0), Source(old, 3.0)], "train", batch_size=50, seed=0), 8)
    assert abs(np.mean(swapped == 10.0) - 0.25) < 0.07


def test_unshuffled_sources_come_one_after_the_other(two_sources):
    ages = _ages(make_dataset(list(two_sources), "val", batch_size=4, augment=False), 100)
    assert ages.tolist() == [10.0] * 6 + [60.0] * 6


def test_sources_are_checked_before_any_data_is_read(two_sources, tmp_path):
    young, old = two_sources
    assert [name for name, *_ in read_sources([young, Source(old, 2, "elders")])] == ["young", "elders"]
    with pytest.raises(ValueError, match="positive number"):
        read_sources([Source(young, 0.0), old])
    with pytest.raises(ValueError, match="positive number"):
        read_sources([Source(young, "heavy"), old])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_sources([young, tmp_path / "nowhere" / "manifest.json"])
    with pytest.raises(ValueError, match="named 'young'"):
        read_sources([young, Source(old, name="young")])
    other = _manifest(
        tmp_path / "other", "other", {"train": [(30.0, 1)]}, chip={**SPEC.to_dict(), "size": 128}
    )
    with pytest.raises(ValueError, match=r"'other'.*face_pipeline\.chip"):
        read_sources([young, other])


def test_balance_weighs_rare_cells_more(tmp_path):
    rows = [(30.0, 1)] * 30 + [(30.0, 0)] * 10 + [(5.0, 1)] * 5 + [(70.0, -1)] * 5
    manifest = _manifest(tmp_path / "skewed", "skewed", {"train": rows})
    assert np.all(balance_table(manifest, "train", 0.0) == 1.0)
    table = balance_table(manifest, "train", 1.0)
    # bands 0-12, 13-19, 20-39, 40-59, 60+, unknown age; columns female, male, unknown gender
    weights = {(30.0, 1): table[2, 1], (30.0, 0): table[2, 0], (5.0, 1): table[0, 1], (70.0, -1): table[4, 2]}
    assert np.mean([weights[row] for row in rows]) == pytest.approx(1.0)  # the loss keeps its scale
    assert weights[(30.0, 1)] < weights[(30.0, 0)] < weights[(5.0, 1)] == pytest.approx(weights[(70.0, -1)])
    assert 30 * weights[(30.0, 1)] == pytest.approx(10 * weights[(30.0, 0)])  # strength 1: equal totals
    batch = next(iter(make_dataset(manifest, "train", batch_size=50, balance=1.0, augment=False, seed=0)))
    inputs, targets, sample_weight = batch
    expected = [
        weights[(float(a), int(g))]
        for a, g in zip(targets["age"].numpy().ravel(), targets["gender"].numpy().ravel(), strict=True)
    ]
    np.testing.assert_allclose(sample_weight.numpy(), expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------- training
def _config(sources, *extra, init_from=None):
    entries = ", ".join(f"{{manifest: '{m}', weight: {w}}}" for m, w in sources)
    return load_config(
        None,
        [
            "model.name=c3ae",
            "model.options={se: true, gender: true}",
            f"data.sources=[{entries}]",
            "data.batch_size=8",
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "train.verbose=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def mixed_run(two_sources, tmp_path_factory) -> tuple[Path, dict]:
    young, old = two_sources
    out = tmp_path_factory.mktemp("mixed") / "run"
    return out, train(_config([(young, 1), (old, 1)], "data.balance=0.5"), out)


@pytest.mark.slow
def test_training_on_two_sources_validates_each(mixed_run):
    out, summary = mixed_run
    assert [(s["name"], s["train_rows"], s["val_rows"]) for s in summary["sources"]] == [
        ("young", 12, 6),
        ("old", 12, 6),
    ]
    lines = (out / "log.csv").read_text().splitlines()
    header = lines[0].split(",")
    for key in ("val_young_age_mae", "val_old_age_mae", "val_young_gender_acc", "val_age_mae"):
        assert key in header
    row = dict(zip(header, lines[1].split(","), strict=True))
    mean = (float(row["val_young_age_mae"]) + float(row["val_old_age_mae"])) / 2
    assert float(row["val_age_mae"]) == pytest.approx(mean, rel=1e-5)
    assert summary["best"]["metric"] == "val_age_mae"


@pytest.mark.slow
def test_publish_cards_every_source_without_machine_paths(mixed_run, tmp_path, monkeypatch):
    import c3ae.bundled as bundled

    out, _ = mixed_run
    monkeypatch.setattr(bundled, "WEIGHTS_DIR", tmp_path / "weights")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("recipe: {name: tiny}\n")
    cross = {"trained_without": "old", "evaluated_on": "old", "mae": 50.0}
    card = bundled.publish(out, "tiny-mix", split="test", recipe=recipe, cross_source=cross)
    test = card["metrics"]["test"]
    assert set(test["sources"]) == {"young", "old"} and set(test["mean"]) >= {"mae", "gender_accuracy"}
    assert test["mean"]["mae"] == pytest.approx(
        (test["sources"]["young"]["mae"] + test["sources"]["old"]["mae"]) / 2
    )
    assert [s["name"] for s in card["data"]["sources"]] == ["young", "old"]
    assert card["recipe"] == {"file": "recipes/tiny.yaml", "text": "recipe: {name: tiny}\n"}
    assert card["cross_source"] == cross
    text = card.to_json()
    assert str(out.parent) not in text and str(tmp_path) not in text


@pytest.mark.slow
def test_bad_sources_fail_before_training_naming_them(two_sources, tmp_path):
    young, old = two_sources
    missing = tmp_path / "gone" / "manifest.json"
    with pytest.raises(TrainingError, match=r"data\.sources\[1\].*gone"):
        train(_config([(young, 1), (missing, 1)]), tmp_path / "a")
    empty = _manifest(tmp_path / "empty", "empty", {"train": [], "val": [(30.0, 1)]})
    with pytest.raises(TrainingError, match=r"data\.sources\[1\].*no training rows"):
        train(_config([(young, 1), (empty, 1)]), tmp_path / "b")
    other = _manifest(
        tmp_path / "other", "other", {"train": [(30.0, 1)]}, chip={**SPEC.to_dict(), "size": 128}
    )
    with pytest.raises(TrainingError, match="face_pipeline.chip"):
        train(_config([(young, 1), (other, 1)]), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"weight must be a number > 0"):
        _config([(young, 1), (old, -2)])
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing was started


@pytest.mark.slow
def test_stages_run_in_order_and_resume(two_sources, tmp_path):
    young, old = two_sources
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "recipe: {name: tiny}\n"
        "model: {name: c3ae, options: {se: true, gender: true}}\n"
        f"data: {{sources: [{{manifest: '{young}'}}, {{manifest: '{old}', weight: 0.5}}], batch_size: 8}}\n"
        "train: {epochs: 1, steps_per_epoch: 2, verbose: 0}\n"
        "stages:\n  - name: warm\n  - name: polish\n    train: {lr: 0.0005}\n"
    )
    stages = load_stages(recipe)
    assert [name for name, _ in stages] == ["warm", "polish"] and stages[1][1].train.lr == 0.0005
    out = tmp_path / "runs"
    train_stages(stages, out)
    second = (out / "2-polish" / "config.yaml").read_text()
    assert str(out / "1-warm" / "best.keras") in second  # the second stage starts from the first
    before = (out / "2-polish" / "best.keras").stat().st_mtime_ns
    summaries = train_stages(load_stages(recipe), out)  # finished stages are skipped
    assert (out / "2-polish" / "best.keras").stat().st_mtime_ns == before
    assert len(summaries) == 2
    with pytest.raises(ConfigError, match="unique"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("stages:\n  - name: a\n  - name: a\n")
        load_stages(bad)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_each_recipe_trains_on_a_tiny_manifest(recipe, two_sources, tmp_path):
    young, old = two_sources
    entries = f"[{{manifest: '{young}', name: utkface}}, {{manifest: '{old}', name: aaf}}]"
    one_source = "manifest" in (yaml.safe_load(recipe.read_text()).get("data") or {})
    data = f"data.manifest={young}" if one_source else f"data.sources={entries}"
    stages = load_stages(recipe, [data, "train.epochs=1", "train.steps_per_epoch=1", "train.verbose=0"])
    stages = [(name, config) for name, config in stages]
    from c3ae.bundled import available_models

    for _, config in stages:
        init = config.train.init_from
        if init and not Path(init).exists() and init not in available_models():  # weights in ../shared
            config.train.init_from = None
    summaries = train_stages(stages, tmp_path / "run")
    assert len(summaries) == len(stages)
    assert all(
        (tmp_path / "run" / f"{i + 1}-{name}" / "best.keras").is_file() for i, (name, _) in enumerate(stages)
    )


@pytest.mark.slow
def test_evaluate_reports_every_source_and_their_mean(two_sources, tmp_path):
    from c3ae.models import build_c3ae

    young, old = two_sources
    build_c3ae(gender=True).save(tmp_path / "model.keras")
    out = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "c3ae.cli", "evaluate", str(tmp_path / "model.keras")]
    command += [
        "--data",
        f"kids={young}",
        "--data",
        str(old),
        "--json",
        str(out),
        "--report",
        str(tmp_path / "r.png"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert set(metrics["sources"]) == {"kids", "old"}
    assert metrics["sources"]["kids"]["count"] == 6
    maes = [metrics["sources"][name]["mae"] for name in ("kids", "old")]
    assert metrics["mean"]["mae"] == pytest.approx(np.mean(maes))
    assert "gender_accuracy_by_gender" in metrics["sources"]["old"]
    assert (tmp_path / "r-kids.png").is_file() and (tmp_path / "r-old.png").is_file()
