"""The typed records (c3ae.records): every shipped card and report reads and writes back unchanged, unknown
keys survive, a record reads like its dict, and the summaries the CLI prints come from ``str``."""

import json
import subprocess
import sys

import pytest

from c3ae.bundled import WEIGHTS_DIR, model_card
from c3ae.errors import DataError
from c3ae.records import ExportReport, Manifest, ModelCard, Shard, VideoSummary

SHIPPED_REPORTS = sorted(WEIGHTS_DIR.glob("*.report.json"))
SHIPPED_CARDS = sorted(set(WEIGHTS_DIR.glob("*.json")) - set(SHIPPED_REPORTS))

VIDEO = {
    "frames": 24,
    "input_frames": 24,
    "broken_frames": 2,
    "missing_frames": 0,
    "interrupted": False,
    "faces": 2,
    "face_boxes": 40,
    "detection_frames": 8,
    "scene_cuts": 1,
    "fps": 12.5,
    "input_fps": 10.0,
    "seconds": 1.92,
    "stages": {"decode": {"seconds": 0.1, "ms_per_frame": 4.167, "calls": 24}},
    "output": "out.mp4",
}

MANIFEST = {
    "format": "c3ae-manifest",
    "version": 1,
    "dataset": "utkface",
    "counts": {"files_scanned": 10, "kept": 8, "kept_fraction": 0.8, "by_split": {"train": 6, "test": 2}},
    "rejects": {"no_face": 2},
    "shards": [
        {"file": "train-00000.feather", "split": "train", "rows": 6},
        {"file": "test-00000.feather", "split": "test", "rows": 2, "path": "/data/test-00000.feather"},
    ],
    "timing": {"faces_per_s": 4.0, "processed_samples": 10, "processing_s": 2.5, "workers": 1},
}


def test_the_weights_folder_ships_cards_and_reports():
    assert len(SHIPPED_CARDS) >= 3 and len(SHIPPED_REPORTS) >= 6


@pytest.mark.parametrize("path", SHIPPED_CARDS + SHIPPED_REPORTS, ids=lambda p: p.name)
def test_every_shipped_file_reads_and_writes_back_unchanged(path):
    kind = ExportReport if path.name.endswith(".report.json") else ModelCard
    text = path.read_text()
    record = kind.from_json(path)
    assert record.extra == {}  # every key of today's layout is a field
    assert record.to_dict() == json.loads(text) and record == json.loads(text)
    assert record.to_json() == text  # byte for byte: same keys, same order
    assert kind.from_json(text) == record == kind.from_json(json.loads(text))


def test_model_card_is_typed_and_reads_like_its_dict():
    card = model_card("c3ae-utk")
    assert isinstance(card, ModelCard)
    assert card.parameters == card["parameters"] == 55_530 and card.trained_on == "utkface"
    assert card.chip["size"] == 160 and card.context == card.preprocessing["chip"]["context"] > 0
    assert card.headline() == card.metrics["test"] and "mae" in card.headline()
    assert "recipe" not in card and card.get("recipe") is None  # an optional key that is not set
    with pytest.raises(KeyError):
        card["recipe"]
    assert str(card).startswith("c3ae-utk: 55,530 parameters, test MAE 5.31")


def test_several_sources_headline_their_mean():
    card = ModelCard.from_json(WEIGHTS_DIR / "c3ae-utk.json").to_dict()
    card["data"] = {"sources": [{"name": "utk"}, {"name": "aaf"}]}
    card["metrics"]["test"] = {"sources": {}, "mean": {"mae": 4.0, "gender_accuracy": 0.9}}
    typed = ModelCard.from_json(card)
    assert typed.trained_on == "utk+aaf" and typed.headline("test") == {"mae": 4.0, "gender_accuracy": 0.9}
    assert str(typed).endswith("test MAE 4.0, gender accuracy 0.9 (mean over sources)")


def test_unknown_keys_are_kept_in_extra_and_written_back():
    data = {**VIDEO, "gpu": "none", "notes": ["from a newer c3ae"]}
    summary = VideoSummary.from_json(data)
    assert summary.extra == {"gpu": "none", "notes": ["from a newer c3ae"]}
    assert summary.to_dict() == data and list(summary) == list(data)
    assert summary["gpu"] == "none"


def test_a_record_is_a_copy_of_what_it_was_read_from():
    data = json.loads(json.dumps(VIDEO))
    summary = VideoSummary.from_json(data)
    data["stages"]["decode"]["calls"] = 0
    assert summary.stages["decode"]["calls"] == 24
    summary.to_dict()["stages"]["decode"]["calls"] = 0
    assert summary.stages["decode"]["calls"] == 24


@pytest.mark.parametrize(
    "data, message",
    [
        ({"frames": 1}, "is not a video summary: it lacks input_frames"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_what_is_not_a_record_is_one_data_error(data, message):
    with pytest.raises(DataError, match=message):
        VideoSummary.from_json(data)


def test_a_file_that_is_not_there_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelCard.from_json(tmp_path / "missing.json")


def test_video_summary_prints_the_cli_line_and_the_stage_table():
    from c3ae.video import format_stages

    summary = VideoSummary.from_json(VIDEO)
    assert str(summary) == (
        "24 frames at 12.5 fps, 2 face track(s); 2 broken frame(s) skipped; output: out.mp4"
    )
    table = summary.stage_table().splitlines()
    assert table[0].split() == ["stage", "ms/frame", "seconds", "calls"]
    assert table[1].split() == ["decode", "4.17", "0.100", "24"]
    assert table[2].split() == ["total", "80.00", "1.920"]
    assert format_stages(VIDEO) == summary.stage_table()
    stopped = VideoSummary.from_json({**VIDEO, "broken_frames": 0, "interrupted": True, "output": None})
    assert str(stopped) == (
        "24 frames at 12.5 fps, 2 face track(s); interrupted; the output is complete up to there"
    )


def test_export_report_prints_what_the_cli_printed():
    report = ExportReport.from_json(WEIGHTS_DIR / "ssrnet-utk.tflite.report.json")
    lines = str(report).splitlines()
    assert lines[0] == f"wrote {report.artifact} ({report.size_bytes / 1024:.1f} KB, tflite none)"
    assert lines[1].startswith(f"verified on {report.verification['crops']} crops from manifest")
    assert "age max |diff| / max(1, |keras|)" in lines[2] and "<= 0.0001" in lines[2]
    assert lines[3] == "  runs on LiteRT's default XNNPACK delegate (as phones run it)"
    assert lines[-1] == f"report: {report.artifact}.report.json"


def test_export_report_fills_stage_by_stage():
    facts = {"model": {}, "inputs": {}, "outputs": []}
    report = ExportReport(status="failed", artifact="m.tflite", format="tflite", quantisation="int8", **facts)
    report.update({"weight_bytes": {"INT8": 10}, "float_ops": {}, "converter": "x"})
    assert report.weight_bytes == {"INT8": 10} and report.extra == {"converter": "x"}
    assert list(report)[7:] == ["weight_bytes", "float_ops", "converter"]  # converter facts after outputs
    report.error = "the converter process was killed by SIGABRT"
    assert str(report).splitlines() == [
        "tflite (int8) export failed: the converter process was killed by SIGABRT",
        "ops left in float by int8 quantisation: none",
        "report: m.tflite.report.json",
    ]
    report.error, report.artifact, report.size_bytes = None, "m.tflite.failed", 2048
    assert str(report).splitlines()[0] == "wrote m.tflite.failed (2.0 KB, tflite int8)"
    assert str(report.report_file) == "m.tflite.report.json"  # next to the requested output


def test_manifest_types_its_shards_and_keeps_what_read_manifest_adds(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST, indent=2) + "\n")
    manifest = Manifest.from_json(tmp_path)  # the folder holding manifest.json
    assert all(isinstance(shard, Shard) for shard in manifest.shards)
    assert manifest.shards[1].extra == {"path": "/data/test-00000.feather"}
    assert manifest["shards"][0]["rows"] == 6 and manifest == MANIFEST
    assert manifest.to_json() == (tmp_path / "manifest.json").read_text()
    assert "face_pipeline" not in manifest.to_dict()  # optional keys not set are not written
    assert str(manifest).splitlines() == [
        "kept 8 of 10 files (80.0%): train 6, test 2",
        "rejected: no_face 2",
        "processed 10 photos in 2.5 s (4.0 photos/s, 1 workers)",
    ]


def test_records_import_neither_tensorflow_nor_keras():
    code = (
        "import sys, c3ae.records, c3ae.bundled; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'numpy'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
