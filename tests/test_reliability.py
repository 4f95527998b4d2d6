"""The user's environment and mistakes: one sentence and a non-zero exit, never a traceback; silent
nonsense becomes a warning or an error. Faults are made by the tests themselves."""

import errno
import shutil

import cv2
import numpy as np
import pytest
from conftest import REPO, face_clip

from c3ae.cli import main
from c3ae.estimator import AgeGenderEstimator, ModelOutputError
from c3ae.faces import ImageReadError, read_image

OBAMA = REPO / "assets" / "obama.jpg"


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("c3ae ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_photo_we_may_not_read_is_skipped_with_its_reason(tmp_path, capsys, monkeypatch):
    """Root reads mode-000 files, so the refusal is simulated where the library reads the bytes."""
    from pathlib import Path

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(OBAMA, folder / "ok.jpg")
    locked = shutil.copy(OBAMA, folder / "locked.jpg")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ImageReadError, match="permission denied"):
        read_image(locked)
    assert main(["predict", str(folder), "--json", str(tmp_path / "faces.json")]) == 0
    assert "skipped 1: permission denied 1" in capsys.readouterr().err


def test_a_folder_where_a_photo_is_expected_says_so(tmp_path):
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


def test_a_full_disk_is_one_sentence_and_exit_1(tmp_path, capsys, monkeypatch):
    import c3ae.files

    def no_space(target, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(c3ae.files, "atomic_write_bytes", no_space)
    assert main(["predict", str(OBAMA), "--json", str(tmp_path / "faces.json")]) == 1
    line = one_line(capsys)
    assert "faces.json: No space left on device; free some space or write elsewhere." in line


def test_a_model_with_nan_weights_is_an_error_not_a_question_mark(tmp_path, capsys):
    from c3ae.models import build_c3ae

    model = build_c3ae(se=True, gender=True)
    layer = next(layer for layer in model.layers if layer.weights and layer.name.startswith("age"))
    weights = layer.get_weights()
    weights[0][...] = np.nan
    layer.set_weights(weights)
    path = tmp_path / "broken.keras"
    model.save(path)
    with pytest.raises(ModelOutputError, match="non-finite"):
        AgeGenderEstimator(str(path), backend="keras").predict(OBAMA)
    assert main(["predict", str(OBAMA), "--model", str(path), "--backend", "keras"]) == 1
    assert "non-finite" in one_line(capsys)


def test_a_float_image_in_0_1_gets_a_warning_naming_the_convention():
    image = cv2.imread(str(OBAMA)).astype(np.float32) / 255.0
    with pytest.warns(UserWarning, match=r"uint8 BGR pixels in \[0, 255\]"):
        read_image(image)


def test_predict_many_on_one_array_says_to_use_predict():
    estimator = AgeGenderEstimator()
    image = cv2.imread(str(OBAMA))
    with pytest.raises(ValueError, match="use predict"):
        estimator.predict_many(image)
    assert len(estimator.predict_many(np.stack([image, image]))) == 2


def test_train_out_naming_a_file_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    assert main(["train", "c3ae", "--out", str(blocker)]) == 2
    assert "is a file" in one_line(capsys)
    assert blocker.read_text() == "not a folder"


def test_preprocess_out_inside_its_root_is_refused(tmp_path, capsys):
    root = tmp_path / "faces"
    root.mkdir()
    shutil.copy(OBAMA, root / "51_0_0_20170101000000000.jpg")
    assert main(["preprocess", "--dataset", "utkface", "--root", str(root), "--out", str(root / "prep")]) == 2
    assert "inside the input folder" in one_line(capsys)
    assert sorted(p.name for p in root.iterdir()) == ["51_0_0_20170101000000000.jpg"]


def test_a_bug_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    import c3ae.cli

    def broken(args):
        raise RuntimeError("an internal invariant failed")

    build = c3ae.cli.build_parser  # the parser binds each subcommand's function when it is built
    monkeypatch.setattr(c3ae.cli, "build_parser", lambda: _with_predict(build(), broken))
    assert main(["predict", str(OBAMA)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal invariant failed" in err
    assert "this is a bug in c3ae" in err


def _with_predict(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["predict"].set_defaults(func=func)
    return parser


def test_a_manifest_that_is_not_json_and_a_config_that_is_a_list_are_named(tmp_path, capsys):
    bad = tmp_path / "manifest.json"
    bad.write_text("not json")
    assert main(["train", "c3ae", f"data.manifest={bad}", "--out", str(tmp_path / "run")]) == 2
    assert "data.manifest:" in one_line(capsys) and not (tmp_path / "run").exists()
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "holds a YAML list" in one_line(capsys)


def test_a_video_whose_frames_cannot_all_be_written_fails_loudly(tmp_path, capsys, monkeypatch):
    """As on a full disk, where OpenCV only logs "Failed to write frame": the count is checked."""
    import c3ae.video

    clip = face_clip(tmp_path / "clip.mp4")
    real_writer = cv2.VideoWriter

    class FillingDisk:
        def __init__(self, *args):
            self.inner, self.count = real_writer(*args), 0

        def isOpened(self):
            return self.inner.isOpened()

        def write(self, frame):
            self.count += 1
            if self.count <= 2:
                self.inner.write(frame)

        def release(self):
            self.inner.release()

    monkeypatch.setattr(c3ae.video.cv2, "VideoWriter", FillingDisk)
    assert main(["video", str(clip), "--output", str(tmp_path / "out.mp4")]) == 2
    line = one_line(capsys)
    assert "only 2 of 6 frames could be written" in line
    assert not (tmp_path / "out.mp4").exists() and len(list(tmp_path.glob(".out*"))) == 0


def test_a_run_folder_of_another_model_is_refused_and_left_alone(tmp_path, capsys):
    from c3ae.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config("ssrnet"), run / "config.yaml")
    before = (run / "config.yaml").read_text()
    assert main(["train", "c3ae", "--out", str(run)]) == 2
    assert "holds a run of another model ('ssrnet'" in one_line(capsys)
    assert (run / "config.yaml").read_text() == before


FAULTY_CONVERTERS = """
import os
import time


def aborts(job):
    print("terminate called without an active exception", flush=True)
    os.abort()


def hangs(job):
    time.sleep(600)
"""


@pytest.fixture
def faulty_converters(tmp_path, monkeypatch) -> str:
    """A module of converters that abort or hang, importable by the export's converter child."""
    folder = tmp_path / "converters"
    folder.mkdir()
    (folder / "faulty_converters.py").write_text(FAULTY_CONVERTERS)
    monkeypatch.syspath_prepend(str(folder))
    return "faulty_converters"


def test_a_converter_that_aborts_is_one_sentence_and_exit_1(faulty_converters, tmp_path, capsys, monkeypatch):
    """As the int8 calibrator did on a corrupt shard row (exit 134): the child dies, the export does not."""
    import json

    import c3ae.export.convert

    monkeypatch.setattr(c3ae.export.convert, "CONVERTER", f"{faulty_converters}:aborts")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["export", "c3ae-utk", "--format", "tflite", "--quant", "int8", "-o", str(out / "m.tflite")]
    assert main(argv) == 1
    line = one_line(capsys)
    assert "Converting to tflite (int8) failed: the converter process was killed by SIGABRT" in line
    assert "terminate called without an active exception" in line  # the child's last words, quoted
    assert sorted(p.name for p in out.iterdir()) == ["m.tflite.report.json"]
    report = json.loads((out / "m.tflite.report.json").read_text())
    assert report["status"] == "failed" and "SIGABRT" in report["error"]


def test_a_converter_that_hangs_is_stopped_at_its_timeout(faulty_converters, tmp_path):
    import time

    from c3ae.export.convert import convert
    from c3ae.export.verify import ConverterError

    started = time.monotonic()
    with pytest.raises(ConverterError, match=r"Converting to onnx did not finish within 2 s"):
        convert(
            None,
            "onnx",
            "none",
            tmp_path / "m.onnx",
            source="c3ae-utk",
            timeout=2,
            converter=f"{faulty_converters}:hangs",
        )
    assert time.monotonic() - started < 30
    assert list(tmp_path.iterdir()) == [tmp_path / "converters"]
