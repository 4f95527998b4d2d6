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


# ------------------------------------------------------------- files no c3ae run wrote are never replaced
def user_file(path, data: bytes) -> bytes:
    """A file of the user's, read-only: as root, permissions protect nothing, so the rule must."""
    path.write_bytes(data)
    path.chmod(0o444)
    return data


def test_output_dir_never_replaces_a_photo_of_the_users(tmp_path, monkeypatch, capsys):
    """`predict party.gif --output-dir .`: the annotated copy would be party.png, the user's own photo."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.open(OBAMA).save(tmp_path / "party.gif")
    mine = user_file(tmp_path / "party.png", (REPO / "assets" / "astronaut.jpg").read_bytes())
    assert main(["predict", "party.gif", "--output-dir", "."]) == 0
    assert (tmp_path / "party.png").read_bytes() == mine
    assert file_kind(tmp_path / "party-2.png") == "image"
    # A rerun replaces its own copy, and still not the user's photo.
    assert main(["predict", "party.gif", "--output-dir", "."]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "party-2.png",
        "party.gif",
        "party.png",
    ]
    assert (tmp_path / "party.png").read_bytes() == mine


def test_two_inputs_of_one_name_never_replace_the_users_file(tmp_path, capsys):
    """a/face.jpg and b/face.jpg: the second copy would be face-2.jpg, which the user already has."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(OBAMA, tmp_path / folder / "face.jpg")
    out = tmp_path / "out"
    out.mkdir()
    mine = user_file(out / "face-2.jpg", b"the user's notes, not a photo\n")
    inputs = [str(tmp_path / "a" / "face.jpg"), str(tmp_path / "b" / "face.jpg")]
    for _ in range(2):  # a rerun replaces only what the first run wrote
        assert main(["predict", *inputs, "--output-dir", str(out)]) == 0
        assert (out / "face-2.jpg").read_bytes() == mine
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
            "face-2.jpg",
            "face-3.jpg",
            "face.jpg",
        ]
    assert file_kind(out / "face.jpg") == file_kind(out / "face-3.jpg") == "image"


def test_output_dir_never_writes_through_a_link_or_into_a_fifo(tmp_path, capsys):
    from c3ae.files import record_output, replaceable_output

    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.jpg"
    data = user_file(target, b"not ours")
    os.symlink(target, out / "obama.jpg")
    os.mkfifo(out / "obama-2.jpg")
    record_output(out / "obama.jpg")  # even a recorded name: a link or a FIFO is never ours
    assert not replaceable_output(out / "obama.jpg") and not replaceable_output(out / "obama-2.jpg")
    assert main(["predict", str(OBAMA), "--output-dir", str(out)]) == 0
    assert target.read_bytes() == data
    assert (out / "obama.jpg").is_symlink() and (out / "obama-2.jpg").is_fifo()
    assert file_kind(out / "obama-3.jpg") == "image"


def test_preprocess_never_replaces_a_manifest_or_rejects_it_did_not_write(tmp_path, capsys):
    from conftest import utk_faces

    root = utk_faces(tmp_path / "utk")
    out = tmp_path / "prep"
    out.mkdir()
    manifest = user_file(out / "manifest.json", b'{"my": "inventory"}\n')
    rejects = user_file(out / "rejects.csv", b"name,reason\nx,y\n")
    err = refused(
        capsys, "preprocess", "--dataset", "utkface", "--root", str(root), "--out", str(out), "--workers", "1"
    )
    assert f"--out {out} holds manifest.json, rejects.csv that c3ae did not write" in err
    assert (out / "manifest.json").read_bytes() == manifest and (out / "rejects.csv").read_bytes() == rejects
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.csv"]
    # Its own folder is resumed: the second run replaces the manifest and rejects.csv the first wrote.
    (out / "manifest.json").unlink()
    (out / "rejects.csv").unlink()
    args = ["preprocess", "--dataset", "utkface", "--root", str(root), "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == "c3ae-manifest"


def test_train_never_replaces_a_config_or_log_it_did_not_write(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  name: c3ae\ndata:\n  manifest: nowhere/manifest.json\n")
    out = tmp_path / "run"
    out.mkdir()
    mine = user_file(out / "config.yaml", b"# my deployment settings\nreplicas: 3\n")
    log = user_file(out / "log.csv", b"time,event\n1,start\n")
    err = refused(capsys, "train", str(config), "--out", str(out))
    assert f"--out {out} holds config.yaml, log.csv that c3ae did not write" in err
    assert (out / "config.yaml").read_bytes() == mine and (out / "log.csv").read_bytes() == log


def test_train_resumes_its_own_run_folder(tmp_path):
    """What train writes is recognised as its own: a config.yaml from dump_config, Keras' log.csv, an empty
    log of a run killed before its first epoch."""
    from c3ae.cli import _run_files
    from c3ae.config import Config, dump_config
    from c3ae.files import foreign_files

    dump_config(Config(), tmp_path / "config.yaml")
    (tmp_path / "log.csv").write_text("epoch,age_mae,loss\n0,9.1,3.2\n")
    assert foreign_files(tmp_path, _run_files()) == []
    (tmp_path / "log.csv").write_text("")
    assert foreign_files(tmp_path, _run_files()) == []


def test_export_bundle_never_replaces_the_users_readme_or_reference(tmp_path, capsys):
    out = tmp_path / "app"
    out.mkdir()
    readme = user_file(out / "README.md", b"# My app\n")
    reference = user_file(out / "reference.py", b"print('mine')\n")
    user_file(out / "notes.txt", b"kept, and not in the way\n")
    err = refused(capsys, "export", "c3ae-utk", "--bundle", str(out))
    assert f"--bundle {out} holds README.md, reference.py that c3ae did not write" in err
    assert (out / "README.md").read_bytes() == readme and (out / "reference.py").read_bytes() == reference
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt", "reference.py"]


def test_export_bundle_replaces_its_own_bundle(tmp_path, capsys):
    out = tmp_path / "app"
    assert main(["export", "c3ae-utk", "--bundle", str(out)]) == 0
    (out / "notes.txt").write_text("the user's, beside the bundle\n")
    assert main(["export", "c3ae-utk", "--bundle", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "the user's, beside the bundle\n"
    (out / "c3ae-utk.tflite").unlink()
    (out / "bundle.json").write_text('{"format": "their-own"}\n')  # no longer ours: nor are its networks
    err = refused(capsys, "export", "c3ae-utk", "--bundle", str(out))
    assert "holds bundle.json, detector/pnet.tflite" in err


def test_export_never_replaces_an_unrelated_report(tmp_path, capsys):
    model = tmp_path / "m.keras"
    shutil.copy(REPO / "c3ae" / "weights" / "c3ae-utk.keras", model)
    report = tmp_path / "m.tflite.report.json"
    data = user_file(report, b'{"quarterly": "report"}\n')
    err = refused(capsys, "export", str(model), "--format", "tflite", "-o", str(tmp_path / "m.tflite"))
    assert f"its report {report} exists and is not one c3ae wrote" in err
    assert report.read_bytes() == data and not (tmp_path / "m.tflite").exists()


def test_video_without_an_output_refuses_before_computing(clip, capsys, monkeypatch):
    import c3ae.cli

    monkeypatch.setattr(c3ae.cli, "_make_estimator", lambda *a, **k: pytest.fail("the model was loaded"))
    err = refused(capsys, "video", str(clip))
    assert "Nothing would be written: give --output" in err and "--jsonl" in err and "--show" in err
