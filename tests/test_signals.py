"""SIGTERM (docker stop, systemd, CI) stops every command as Ctrl-C does, with exit code 143: the finished
results are written, a video is finalised and playable, no temporary is left. A reader of stdout that
leaves (`| head -1`) costs nothing: --json and --csv are still written, and the command exits quietly.

Each case runs the real command in a child process and signals it from outside, or, where the moment must
be exact, has the command signal itself at a chosen step."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import cv2
import pytest
from conftest import REPO, utk_faces

OBAMA = REPO / "assets" / "obama.jpg"
RUN = "import sys; from c3ae.cli import main; sys.exit(main(sys.argv[1:]))"
NOISE = ("Traceback", "Exception ignored", "BrokenPipeError")


def start(args, cwd, prelude: str = "", env_tmp=None) -> subprocess.Popen:
    """``c3ae ARGS`` in a child process, stdout and stderr piped and unbuffered (each line reaches the
    pipe as it is printed), after ``prelude`` (Python run first, in the child); ``env_tmp``: its TMPDIR."""
    code = textwrap.dedent(prelude) + "\n" + RUN
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} | ({"TMPDIR": str(env_tmp)} if env_tmp else {})
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """(the rest of stdout, stderr) once the process ends. Read through the pipes' own buffers, which
    hold what ``readline`` read ahead (``communicate`` would skip it), stderr on a thread of its own."""
    import threading

    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(process.stderr.read()), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        out = process.stdout.read()
        process.wait()
        reader.join()
    finally:
        timer.cancel()
    assert process.returncode != -signal.SIGKILL, f"killed after {timeout} s: {err}"
    return out, err[0]


def temporaries(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".partial-" in p.name)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(48):
        shutil.copy(OBAMA, folder / f"{index:02d}.jpg")
    return folder


def test_sigterm_stops_predict_with_its_results_written(photos, tmp_path):
    out_json, out_csv = tmp_path / "faces.json", tmp_path / "faces.csv"
    process = start(["predict", photos, "--json", out_json, "--csv", out_csv], tmp_path)
    first = process.stdout.readline()  # the first batch is done
    assert first.endswith(": 1 face\n") or " M" in first or " F" in first, first
    process.send_signal(signal.SIGTERM)
    _, err = finish(process)
    assert process.returncode == 143, err
    assert not any(noise in err for noise in NOISE), err
    records = json.loads(out_json.read_text())
    assert 1 <= len(records) < 48
    assert f"interrupted after {len(records)} of 48 image(s); their results are in --json" in err
    assert len(list(csv.DictReader(out_csv.open()))) == len(records)
    assert temporaries(tmp_path) == []


def long_clip(path, frames: int, size: tuple[int, int] = (192, 144)):
    """An mp4v clip of the bundled photo swaying left and right on a grey frame."""
    import numpy as np

    width, height = size
    face = cv2.resize(cv2.imread(str(OBAMA)), (width // 2, height * 5 // 6))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size)
    for index in range(frames):
        frame = np.full((height, width, 3), 80, np.uint8)
        left = width // 16 + 2 * abs(index % 20 - 10)
        frame[height // 12 : height // 12 + face.shape[0], left : left + face.shape[1]] = face
        writer.write(frame)
    writer.release()
    return path


def test_sigterm_finalises_the_video_and_its_json_lines(tmp_path):
    clip = long_clip(tmp_path / "clip.mp4", frames=400)
    out = tmp_path / "out.mp4"
    process = start(["video", clip, "--output", out, "--jsonl", "-", "--detect-every", "5"], tmp_path)
    lines = [json.loads(process.stdout.readline()) for _ in range(4)]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3]
    process.send_signal(signal.SIGTERM)
    rest, err = finish(process)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    lines += [json.loads(line) for line in rest.splitlines()]
    summary = lines.pop()["summary"]
    # It stops between two frames: each output holds the same frames, as many as the summary says.
    assert summary["interrupted"] is True and 4 <= summary["frames"] < 400
    assert [line["frame"] for line in lines] == list(range(summary["frames"]))
    capture = cv2.VideoCapture(str(out))  # playable: every written frame decodes
    decoded = 0
    while capture.read()[0]:
        decoded += 1
    assert decoded == summary["frames"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out.mp4"]


SIGTERM_AT_THIRD_SAMPLE = """
    import os, signal
    from c3ae.preprocessing import pipeline
    real, calls = pipeline.process_sample, []
    def process_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    pipeline.process_sample = process_sample
"""


def test_sigterm_stops_preprocess_resumably(tmp_path):
    root = utk_faces(tmp_path / "utk")
    out = tmp_path / "prep"
    args = ["preprocess", "--dataset", "utkface", "--root", root, "--out", out, "--workers", "1"]
    process = start(args, tmp_path, SIGTERM_AT_THIRD_SAMPLE)
    _, err = finish(process)
    assert process.returncode == 143, err
    assert "c3ae preprocess: stopped by SIGTERM. Finished work is kept; rerun the same command" in err
    assert "Traceback" not in err and temporaries(out) == []
    assert not (out / "manifest.json").exists()
    process = start(args, tmp_path)
    _, err = finish(process)
    assert process.returncode == 0, err
    assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 6


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("label", ["label", "prep/manifest.json", "--teacher", "t.dat"]),
        ("train", ["train", "c.yaml"]),
        ("evaluate", ["evaluate", "c3ae-utk", "--data", "prep/manifest.json"]),
    ],
)
def test_sigterm_is_ctrl_c_with_exit_143_in_every_command(tmp_path, command, args):
    """Whatever the command does when SIGTERM comes, it unwinds as after Ctrl-C (its own clean-up runs)."""
    prelude = f"""
        import os, signal, time
        import c3ae.cli as cli
        def stopped(args):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one, while cleaning up: ignored
                print("cleaned up", flush=True)
        cli.cmd_{command} = stopped
    """
    process = start(args, tmp_path, prelude)
    out, err = finish(process, timeout=25)
    assert process.returncode == 143, err
    assert out == "cleaned up\n"
    assert err.startswith(f"c3ae {command}: stopped by SIGTERM.") and err.count("\n") == 1, err


def test_a_forked_child_dies_of_sigterm_as_usual(tmp_path):
    """The handler belongs to the command's process: a forked worker ends on SIGTERM, as pool.terminate()
    expects, instead of raising in code that does not wait for it."""
    prelude = """
        import os, signal, time
        import c3ae.cli as cli
        def fork(args):
            ready, tell = os.pipe()
            child = os.fork()
            if child == 0:
                os.write(tell, b"!")
                time.sleep(30)
                os._exit(0)
            os.read(ready, 1)
            os.kill(child, signal.SIGTERM)
            _, status = os.waitpid(child, 0)
            print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
            return 0
        cli.cmd_label = fork
    """
    process = start(["label", "m.json", "--teacher", "t.dat"], tmp_path, prelude)
    out, err = finish(process, timeout=25)
    assert (process.returncode, out) == (0, "True\n"), err


def test_a_reader_that_leaves_loses_nothing(photos, tmp_path):
    """`c3ae predict DIR --json out.json | head -1`: every photo still reaches --json and --csv, and the
    command exits 0 without a word about the pipe."""
    out_json, out_csv = tmp_path / "faces.json", tmp_path / "faces.csv"
    process = start(["predict", photos, "--json", out_json, "--csv", out_csv], tmp_path)
    assert process.stdout.readline()
    process.stdout.close()  # what head does after its line
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert not any(noise in err for noise in NOISE), err
    assert "48 image(s), 48 face(s)" in err
    assert len(json.loads(out_json.read_text())) == 48
    assert len(list(csv.DictReader(out_csv.open()))) == 48


def test_a_reader_that_leaves_stops_a_command_with_nothing_else_to_write(photos, tmp_path):
    process = start(["predict", photos], tmp_path)
    assert process.stdout.readline()
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert not any(noise in err for noise in NOISE) and "48 image(s)" not in err, err


def test_sigterm_stops_export_with_its_converter_and_temporaries(tmp_path):
    """SIGTERM while the converter's child process runs: the child is stopped with it, its work folder is
    removed, and no artifact, report or temporary is left."""
    import time

    model = tmp_path / "m.keras"
    shutil.copy(REPO / "c3ae" / "weights" / "c3ae-utk.keras", model)
    work, out = tmp_path / "tmp", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    process = start(["export", model, "--format", "tflite", "-o", out / "m.tflite"], tmp_path, env_tmp=work)
    deadline = time.monotonic() + 240
    while not list(work.glob("c3ae-convert-*/job.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "the converter never started"
        time.sleep(0.2)
    job = next(work.glob("c3ae-convert-*/job.json"))
    process.send_signal(signal.SIGTERM)
    _, err = finish(process)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "c3ae export: stopped by SIGTERM.", err
    assert list(work.iterdir()) == [] and list(out.iterdir()) == []
    children = [p for p in os.listdir("/proc") if p.isdigit() and str(job) in _cmdline(p)]
    assert children == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_reader_of_video_json_lines_that_leaves_costs_no_frame(tmp_path):
    """`c3ae video clip.mp4 --jsonl - --output out.mp4 | head -1`: the video still gets every frame. The
    lines outgrow the pipe's buffer, so the reader's leaving is always seen."""
    clip = long_clip(tmp_path / "clip.mp4", frames=1500)
    out = tmp_path / "out.mp4"
    process = start(["video", clip, "--jsonl", "-", "--output", out], tmp_path)
    assert json.loads(process.stdout.readline())["frame"] == 0
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert not any(noise in err for noise in NOISE), err
    assert "1500 frames at" in err
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 1500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out.mp4"]
