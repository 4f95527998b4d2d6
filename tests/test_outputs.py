"""The one rule for outputs: never an input, never inside an input folder, never over a file of another
kind; and an interrupted batch keeps what it finished. Each case checks the exit code, the one-line error,
and that every input is intact."""

import hashlib
import json
import os
import shutil

import pytest
from conftest import REPO, face_clip

from c3ae.cli import main
from c3ae.files import OutputError, check_output, file_kind

OBAMA = REPO / "assets" / "obama.jpg"


def digests(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def album(tmp_path):
    root = tmp_path / "album"
    root.mkdir()
    shutil.copy(OBAMA, root / "obama.jpg")
    shutil.copy(REPO / "assets" / "astronaut.jpg", root / "astronaut.jpg")
    return root


@pytest.fixture
def clip(tmp_path):
    return face_clip(tmp_path / "clip.mp4")


def refused(capsys, *args) -> str:
    before = capsys.readouterr()  # noqa: F841  (drop earlier output)
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_predict_never_writes_over_its_photo(album, capsys, option):
    before = digests(album)
    photo = album / "obama.jpg"
    err = refused(capsys, "predict", str(photo), option, str(photo))
    assert f"{option} {photo} is the input" in err
    assert digests(album) == before


def test_predict_follows_symlinks_to_an_input(album, tmp_path, capsys):
    before = digests(album)
    link = tmp_path / "faces.json"
    os.symlink(album / "obama.jpg", link)
    err = refused(capsys, "predict", str(album / "obama.jpg"), "--json", str(link))
    assert "is the input" in err
    assert digests(album) == before


def test_predict_refuses_outputs_inside_the_folder_it_reads(album, capsys):
    before = digests(album)
    err = refused(capsys, "predict", str(album), "--json", str(album / "faces.json"))
    assert "inside the input folder" in err
    err = refused(capsys, "predict", str(album), "--output-dir", str(album / "annotated"))
    assert "inside the input folder" in err
    err = refused(capsys, "predict", str(album), "--output-dir", str(album))
    assert "is the input folder" in err
    err = refused(capsys, "predict", str(album), "--output-dir", str(album.parent))
    assert "holds the input" in err
    assert digests(album) == before


def test_predict_replaces_its_own_json_but_not_a_photo_of_another_name(album, tmp_path, capsys):
    old = tmp_path / "faces.json"
    old.write_text("[]\n")
    assert main(["predict", str(album / "obama.jpg"), "--json", str(old)]) == 0
    assert len(json.loads(old.read_text())[0]["faces"]) == 1
    other = shutil.copy(OBAMA, tmp_path / "holiday.json")  # a photo under a JSON name: not replaced
    err = refused(capsys, "predict", str(album / "obama.jpg"), "--json", str(other))
    assert "already exists and holds an image file" in err
    assert (tmp_path / "holiday.json").read_bytes() == OBAMA.read_bytes()


@pytest.mark.parametrize("option", ["--output", "--jsonl"])
def test_video_never_writes_over_its_input(clip, capsys, option):
    data = clip.read_bytes()
    target = clip if option == "--jsonl" else clip
    err = refused(capsys, "video", str(clip), option, str(target))
    assert "is the input" in err
    assert clip.read_bytes() == data


def test_export_never_writes_over_its_model(tmp_path, capsys):
    model = tmp_path / "model.keras"
    shutil.copy(REPO / "c3ae" / "weights" / "c3ae-utk.keras", model)
    data = model.read_bytes()
    err = refused(capsys, "export", str(model), "--format", "tflite", "-o", str(model))
    assert "-o" in err and "is the input" in err
    assert model.read_bytes() == data


def test_interrupted_predict_keeps_the_finished_images(album, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first image: its JSON and CSV rows are written, and the command says so."""
    from c3ae import estimator as estimator_module

    original = estimator_module.AgeGenderEstimator.estimate_aligned  # one call per batch of photos
    calls = []

    def interrupt_second_call(self, faces):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(self, faces)

    monkeypatch.setattr(estimator_module.AgeGenderEstimator, "estimate_aligned", interrupt_second_call)
    photos = tmp_path / "many"
    photos.mkdir()
    for index in range(10):
        shutil.copy(OBAMA, photos / f"{index:02d}.jpg")
    out_json, out_csv = tmp_path / "faces.json", tmp_path / "faces.csv"
    assert main(["predict", str(photos), "--json", str(out_json), "--csv", str(out_csv)]) == 130
    err = capsys.readouterr().err
    records = json.loads(out_json.read_text())
    assert 1 <= len(records) < 10
    assert f"interrupted after {len(records)} of 10 image(s)" in err and "--json" in err
    assert len(out_csv.read_text().splitlines()) == len(records) + 1


def test_check_output_and_file_kinds(tmp_path):
    photo = shutil.copy(OBAMA, tmp_path / "a.jpg")
    assert file_kind(photo) == "image"
    (tmp_path / "t.json").write_text('{"a": 1}')
    assert file_kind(tmp_path / "t.json") == "json"
    (tmp_path / "t.bin").write_bytes(b"\x00\x01\x02")
    assert file_kind(tmp_path / "t.bin") == "binary"
    assert file_kind(REPO / "c3ae" / "weights" / "c3ae-utk.tflite") == "tflite"
    with pytest.raises(OutputError, match="is the input"):
        check_output(tmp_path / "." / "a.jpg", "-o", [photo])
    hard = tmp_path / "hard.json"
    os.link(photo, hard)
    with pytest.raises(OutputError, match="is the input"):
        check_output(hard, "--json", [photo], ("json",))
    assert check_output(tmp_path / "new.json", "--json", [photo], ("json",)) == tmp_path / "new.json"


# ------------------------------------------------------------------------- outputs that are not regular files
def fake_null(folder):
    """A character device like /dev/null (1, 3) in ``folder``: needs root and a file system that allows
    device nodes; never the real /dev/null, which a regression would turn into a file for the machine."""
    import stat

    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    node = folder / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with open(node, "wb") as handle:
            handle.write(b"probe")
    except OSError as error:
        pytest.skip(f"no device nodes here ({error.strerror})")
    return node


def is_device(path) -> bool:
    import stat

    return stat.S_ISCHR(os.lstat(path).st_mode)


def test_a_device_output_is_written_in_place_never_replaced(album, tmp_path, capsys):
    from c3ae.files import AtomicOutput, atomic_write_text, written_in_place

    null = fake_null(tmp_path)
    assert written_in_place(null) and file_kind(null) == "special"
    atomic_write_text(null, "{}")
    staged = AtomicOutput(null)
    assert staged.path == null
    staged.discard()
    staged.commit()
    assert is_device(null)
    # Both outputs of one command on the one device: allowed (it discards), and it stays a device.
    assert main(["predict", str(album / "obama.jpg"), "--json", str(null), "--csv", str(null)]) == 0
    assert is_device(null)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["album", "null"]  # no temporary left beside it


def test_a_fifo_output_is_written_into_the_pipe(album, tmp_path, capsys):
    import threading

    fifo = tmp_path / "faces.json"
    os.mkfifo(fifo)
    assert file_kind(fifo) == "special"  # not read: reading a FIFO blocks
    received = []

    def read() -> None:
        with open(fifo, "rb") as handle:
            received.append(handle.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert main(["predict", str(album / "obama.jpg"), "--json", str(fifo)]) == 0
    finally:
        if reader.is_alive() and not received:  # unblock a reader that never got a writer
            with open(fifo, "wb"):
                pass
    reader.join(timeout=30)
    assert not reader.is_alive()
    (result,) = json.loads(received[0])
    assert result["path"].endswith("obama.jpg") and len(result["faces"]) == 1
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["album", "faces.json"]


def test_dev_stdout_is_written_where_stdout_goes(tmp_path):
    """A link to /proc/self/fd/1 (what /dev/stdout is) with stdout redirected to a regular file: the JSON
    goes into that file through the link, which stays a link (a rename would have replaced it)."""
    import subprocess
    import sys

    from c3ae.files import written_in_place

    assert written_in_place("/dev/stdout") and written_in_place("/dev/null")
    link = tmp_path / "stdout"
    os.symlink("/proc/self/fd/1", link)
    assert written_in_place(link)
    out = tmp_path / "out.txt"
    code = "import sys; from c3ae.files import atomic_write_text; atomic_write_text(sys.argv[1], '[1, 2]')"
    with open(out, "wb") as handle:
        subprocess.run([sys.executable, "-c", code, str(link)], stdout=handle, check=True, timeout=120)
    assert out.read_text() == "[1, 2]" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "stdout"]


def test_two_outputs_on_one_path_are_refused(album, tmp_path, capsys):
    out = tmp_path / "faces.out"
    err = refused(capsys, "predict", str(album / "obama.jpg"), "--json", str(out), "--csv", str(out))
    assert f"--json and --csv both name {out}" in err
    link = tmp_path / "link.out"
    os.symlink(out, link)
    err = refused(capsys, "predict", str(album / "obama.jpg"), "--json", str(out), "--csv", str(link))
    assert "--json and --csv both name" in err
    assert not out.exists()


def test_bench_data_never_writes_over_its_manifest(tmp_path, capsys):
    data = tmp_path / "prep"
    data.mkdir()
    manifest = data / "manifest.json"
    manifest.write_text('{"shards": []}\n')
    before = digests(data)
    err = refused(capsys, "bench", "data", "--data", str(manifest), "--json", str(manifest))
    assert f"--json {manifest} is the input" in err
    err = refused(capsys, "bench", "data", "--data", str(data), "--json", str(manifest))
    assert "inside the input folder" in err
    assert digests(data) == before
