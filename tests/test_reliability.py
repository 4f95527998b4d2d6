"""The user's environment and mistakes: one sentence and a non-zero exit, never a traceback; silent
nonsense becomes a warning or an error. Faults are made by the tests themselves."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from conftest import REPO, face_clip, utk_faces

from c3ae.bench import MEASURED_CLI, peak_rss_mb
from c3ae.cli import main
from c3ae.estimator import AgeGenderEstimator, ModelOutputError
from c3ae.faces import ImageReadError, read_image

OBAMA = REPO / "assets" / "obama.jpg"
ASTRONAUT = REPO / "assets" / "astronaut.jpg"


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


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _photos(folder):
    folder.mkdir()
    for photo in (OBAMA, ASTRONAUT):
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB tmpfs filled to its last byte; skips where this user may not mount one."""
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a small tmpfs to fill ({error}); it needs root or CAP_SYS_ADMIN")
    if done.returncode != 0:
        why = done.stderr.strip() or f"exit {done.returncode}"
        pytest.skip(f"cannot mount a small tmpfs to fill ({why}); it needs root or CAP_SYS_ADMIN")
    try:
        with open(mount / "filler", "wb", buffering=0) as handle:
            with pytest.raises(OSError) as caught:
                while True:
                    handle.write(bytes(1 << 16))
        assert caught.value.errno == errno.ENOSPC and shutil.disk_usage(mount).free == 0
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _left_on(disk) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if not p.is_dir())


def test_predict_onto_a_full_disk_is_one_sentence_and_leaves_nothing(full_disk, tmp_path, capsys):
    photos = _photos(tmp_path / "in")
    before = _snapshot(photos)
    assert main(["predict", str(photos), "--json", str(full_disk / "faces.json")]) == 1
    assert f"{full_disk / 'faces.json'}: No space left on device; free some space" in one_line(capsys)
    assert main(["predict", str(photos), "--output-dir", str(full_disk / "annotated")]) == 1
    line = one_line(capsys)
    assert "No space left on device" in line and str(full_disk / "annotated") in line
    assert _left_on(full_disk) == ["filler"]  # no temporary, no half-written file
    assert _snapshot(photos) == before


def test_video_onto_a_full_disk_fails_and_keeps_nothing(full_disk, tmp_path, capsys):
    clip = face_clip(tmp_path / "clip.mp4")
    before = clip.read_bytes()
    assert main(["video", str(clip), "--output", str(full_disk / "out.mp4")]) == 1
    assert f"{full_disk / 'out.mp4'}: No space left on device" in one_line(capsys)
    assert main(["video", str(clip), "--jsonl", str(full_disk / "tracks.jsonl")]) == 1
    assert f"{full_disk / 'tracks.jsonl'}: No space left on device" in one_line(capsys)
    assert _left_on(full_disk) == ["filler"] and clip.read_bytes() == before


def test_preprocess_onto_a_full_disk_is_one_sentence_and_leaves_no_shard(full_disk, tmp_path, capsys):
    root = utk_faces(tmp_path / "utk")
    before = _snapshot(root)
    assert (
        main(["preprocess", "--dataset", "utkface", "--root", str(root), "--out", str(full_disk / "p")]) == 1
    )
    line = one_line(capsys)
    assert str(full_disk / "p") in line and "No space left on device" in line
    assert _left_on(full_disk) == ["filler"] and _snapshot(root) == before


def _damaged_in_the_middle(data: bytes, how: str) -> bytes:
    """``data`` (a JPEG) with its scan data zeroed, cut or garbled half-way; SOI and EOI are kept."""
    start = data.index(b"\xff\xda")  # start of scan
    middle = (start + len(data)) // 2
    damaged = bytearray(data)
    if how == "zeroed":
        damaged[middle : middle + 2000] = bytes(2000)
    elif how == "cut":
        del damaged[middle : middle + 20000]
    else:
        damaged[middle : middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    assert damaged[:2] == b"\xff\xd8" and damaged[-2:] == b"\xff\xd9"
    return bytes(damaged)


@pytest.mark.parametrize("how", ["zeroed", "cut", "garbled"])
def test_a_jpeg_damaged_in_its_middle_is_refused(how):
    """OpenCV decodes it without a word (libjpeg only prints a warning to stderr) into a half-grey photo."""
    with pytest.raises(ImageReadError, match="corrupt image: Corrupt JPEG data"):
        read_image(_damaged_in_the_middle(OBAMA.read_bytes(), how))


def test_predict_skips_a_jpeg_damaged_in_its_middle_and_reports_the_others(tmp_path, capfd):
    photos = _photos(tmp_path / "in")
    (photos / "damaged.jpg").write_bytes(_damaged_in_the_middle(OBAMA.read_bytes(), "cut"))
    before = _snapshot(photos)
    output = tmp_path / "faces.json"
    assert main(["predict", str(photos), "--json", str(output)]) == 0  # skipped photos are not failures
    records = json.loads(output.read_text())
    assert sorted(os.path.basename(r["path"]) for r in records) == ["astronaut.jpg", "obama.jpg"]
    assert all(len(r["faces"]) == 1 for r in records)
    err = capfd.readouterr().err
    assert "damaged.jpg: corrupt image: Corrupt JPEG data: premature end of data segment" in err
    assert "skipped 1: corrupt image 1" in err and "Traceback" not in err
    assert "\nCorrupt JPEG data" not in "\n" + err  # libjpeg's own line, which names no file, is not shown
    assert _snapshot(photos) == before


KILLABLE_PREPROCESS = """
import sys
import threading
from pathlib import Path

import c3ae.preprocessing.pipeline as pipeline
from c3ae.bench import MEASURED_CLI, peak_rss_mb
from c3ae.cli import main

marker = Path(sys.argv[1])
original = pipeline.process_sample
calls = []


def process_sample(sample, face_pipeline=None, fallback_full_image=False):
    calls.append(sample)
    if len(calls) == 3:  # two samples are done, so at least one shard is written: wait to be killed
        marker.write_text("waiting")
        threading.Event().wait()
    return original(sample, face_pipeline, fallback_full_image)


pipeline.process_sample = process_sample
pipeline.preprocess.__kwdefaults__["rows_per_shard"] = 2
sys.exit(main(sys.argv[2:]))
"""


def test_preprocess_killed_mid_run_resumes_to_the_same_manifest(tmp_path, monkeypatch, capsys):
    """kill -9 while the run waits inside its third sample (made to wait there, so the kill always lands
    mid-run); the rerun keeps the finished shards, redoes the rest, and matches an uninterrupted run."""
    import c3ae.preprocessing.pipeline as pipeline

    root = utk_faces(tmp_path / "utk")
    out, marker = tmp_path / "prep", tmp_path / "waiting"
    argv = ["preprocess", "--dataset", "utkface", "--root", str(root), "--out", str(out)]
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_PREPROCESS, str(marker), *argv], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the preprocess child never reached its third sample"
            time.sleep(0.05)
        child.kill()
        assert child.wait(timeout=60) == -9
    finished = sorted(p.name for p in out.glob(".*.feather.json"))
    assert finished and not (out / "manifest.json").exists()
    stale = out / f".train-00009.partial-{child.pid}.feather"  # what a kill during a write leaves
    stale.write_bytes(b"half a shard")

    monkeypatch.setitem(pipeline.preprocess.__kwdefaults__, "rows_per_shard", 2)
    assert main(argv) == 0
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["timing"]["processed_samples"] < resumed["counts"]["samples"]  # finished shards kept
    assert not stale.exists() and not list(out.glob(".*partial*"))
    fresh = tmp_path / "fresh"
    assert main([*argv[:-1], str(fresh)]) == 0
    uninterrupted = json.loads((fresh / "manifest.json").read_text())
    assert resumed["counts"] == uninterrupted["counts"] and resumed["counts"]["kept"] == 6
    assert [(s["file"], s["rows"]) for s in resumed["shards"]] == [
        (s["file"], s["rows"]) for s in uninterrupted["shards"]
    ]


def _without_root_file_access() -> list[str]:
    """A command prefix under which a child cannot read a mode-000 file: none for a normal user, setpriv
    dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for root (who reads every file); skips otherwise."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which reads mode-000 files, and setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_predict_without_permission_skips_the_photo_and_names_the_output(tmp_path):
    """Real permission errors (not simulated ones), in a child: a mode-000 photo, a read-only folder."""
    photos = _photos(tmp_path / "in")
    locked = photos / "obama.jpg"
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    prefix = _without_root_file_access()
    predict = [*prefix, sys.executable, "-m", "c3ae.cli", "predict", str(photos)]
    locked.chmod(0)
    readonly.chmod(0o555)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(locked)!r})"], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this machine does not let a child give up root's power to read any file")
        read = subprocess.run([*predict, "--json", "-"], capture_output=True, text=True, timeout=300)
        write = subprocess.run(
            [*predict, "--csv", str(readonly / "faces.csv")], capture_output=True, text=True, timeout=300
        )
    finally:
        locked.chmod(0o644)
        readonly.chmod(0o755)
    assert read.returncode == 0 and "Traceback" not in read.stderr, read.stderr
    assert f"skipped {locked}: permission denied" in read.stderr
    assert "skipped 1: permission denied 1" in read.stderr
    records = json.loads(read.stdout)  # the photo it could read is reported
    assert [os.path.basename(r["path"]) for r in records] == ["astronaut.jpg"]
    assert write.returncode == 1 and "Traceback" not in write.stderr, write.stderr
    errors = [line for line in write.stderr.splitlines() if line.startswith("c3ae ")]
    assert len(errors) == 1, write.stderr
    assert errors[0].startswith(f"c3ae predict: error: {readonly / 'faces.csv'}: Permission denied; ")
    assert not list(readonly.iterdir())


def test_36_megapixel_photos_and_their_annotated_copies_stay_bounded(tmp_path):
    """Decode (OpenCV needs twice the photo while decoding), detection on a 1280-pixel copy, an annotated
    copy drawn in place, one such photo per batch: about 450 MB here, where 5.5 GB was once measured."""
    photos = tmp_path / "big"
    photos.mkdir()
    height, width = 4912, 7360  # 36.2 megapixels
    background = np.random.default_rng(0).integers(60, 200, (height // 16, width // 16, 3), np.uint8)
    image = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
    image[1000:2500, 3000:4200] = cv2.resize(cv2.imread(str(OBAMA)), (1200, 1500))
    cv2.imwrite(str(photos / "a.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    del image
    shutil.copy(photos / "a.jpg", photos / "b.jpg")
    out = tmp_path / "annotated"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURED_CLI,
            "predict",
            str(photos),
            "--output-dir",
            str(out),
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    peak = peak_rss_mb(done.stderr)
    # About 550 MB (VmHWM). The 1.55 GB once seen on CI, and 2.9 GB in a `-m "not slow"` run, were the
    # pytest parent's size leaking in through ru_maxrss (see MEASURED_CLI). The old growth was 5.5 GB.
    assert peak < 1430, f"peak RSS {peak:.0f} MB"
    records = json.loads(done.stdout)
    assert [len(r["faces"]) for r in records] == [1, 1]
    assert cv2.imread(str(out / "big" / "b.jpg")).shape == (height, width, 3)


def test_a_plain_value_error_is_a_bug_and_a_c3ae_error_names_the_flag(capsys, monkeypatch):
    import c3ae.cli
    from c3ae.errors import C3AEError
    from c3ae.video import VideoError

    def plain(args):
        raise ValueError("a genuine bug, not the user's mistake")

    build = c3ae.cli.build_parser
    monkeypatch.setattr(c3ae.cli, "build_parser", lambda: _with_predict(build(), plain))
    assert main(["predict", str(OBAMA)]) == 1
    assert "this is a bug in c3ae" in capsys.readouterr().err

    def library_error(args):
        raise VideoError("output clip.xyz: unsupported video type.", parameter="output")

    monkeypatch.setattr(c3ae.cli, "build_parser", lambda: _with_predict(build(), library_error))
    assert main(["predict", str(OBAMA)]) == 2
    assert one_line(capsys) == "c3ae predict: error: --output clip.xyz: unsupported video type."
    assert issubclass(VideoError, C3AEError) and issubclass(VideoError, ValueError)


def test_every_library_error_shares_one_base():
    import inspect

    import c3ae.bundled
    import c3ae.config
    import c3ae.data
    import c3ae.detector
    import c3ae.estimator
    import c3ae.export.bundle
    import c3ae.export.checks
    import c3ae.extras
    import c3ae.faces
    import c3ae.files
    import c3ae.legacy
    import c3ae.preprocessing.pipeline
    import c3ae.preprocessing.shards
    import c3ae.runtime
    import c3ae.task
    import c3ae.train
    import c3ae.video
    from c3ae.errors import C3AEError

    modules = [
        c3ae.bundled,
        c3ae.config,
        c3ae.data,
        c3ae.detector,
        c3ae.estimator,
        c3ae.extras,
        c3ae.faces,
        c3ae.files,
        c3ae.legacy,
        c3ae.runtime,
        c3ae.task,
        c3ae.train,
        c3ae.video,
        c3ae.export.bundle,
        c3ae.export.checks,
        c3ae.preprocessing.pipeline,
        c3ae.preprocessing.shards,
    ]
    errors = [
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception)
        and cls.__module__ == module.__name__
        and not cls.__name__.startswith("_")
    ]
    assert len(errors) >= 12
    assert [cls.__name__ for cls in errors if not issubclass(cls, C3AEError)] == []
