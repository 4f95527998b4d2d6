"""Training that cannot hang or corrupt itself (issue 21, point 6) and a quiet training side (issue 20,
point 4), without training: the run-folder lock, atomic resume backups, finished runs answered at once,
Keras' dataset lengths, fit's verbosity, the curves, the spinner and the evaluation tables."""

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from c3ae.config import dump_config, load_config
from c3ae.run_folder import LOCK_FILE, RunFolderBusyError, RunLock, finished_summary


# ------------------------------------------------------------------------------------------ the lock
def _hold_in_child(folder):
    """A child process that holds ``folder``'s lock until killed."""
    code = (
        "import sys, time\n"
        "from c3ae.run_folder import RunLock\n"
        "with RunLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_training_in_one_folder_is_refused_in_one_sentence(tmp_path):
    child = _hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(
            RunFolderBusyError, match=rf"in use by another c3ae train \(process {child.pid}\)"
        ):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path / "run"):  # its holder died: the kernel released the lock
        assert (tmp_path / "run" / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (folder / LOCK_FILE).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with RunLock(folder), RunLock(folder):  # re-entrant in one process: a recipe holds its stages' folder
        assert (folder / LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_the_cli_refuses_a_busy_run_folder_before_loading_tensorflow(tmp_path, monkeypatch, capsys):
    import c3ae.cli as cli

    loaded = []
    monkeypatch.setattr(cli, "_quiet_tensorflow", lambda load=False: loaded.append(load))
    child = _hold_in_child(tmp_path / "run")
    try:
        assert cli.main(["train", "c3ae", "--out", str(tmp_path / "run"), "data.manifest=m.json"]) == 2
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is in use by another c3ae train" in err and "give another --out" in err
    assert True not in loaded  # at once: it took 30 s to say so when it loaded TensorFlow first


def test_a_run_that_fails_at_once_leaves_no_folder_behind(tmp_path, capsys):
    from c3ae.cli import main

    missing = f"data.manifest={tmp_path / 'none' / 'manifest.json'}"
    assert main(["train", "c3ae", "--out", str(tmp_path / "new"), missing]) == 2
    assert "data.manifest: No manifest at" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------- atomic resume backups
def _tiny_model():
    import keras

    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1, name="age")(inputs))
    model.compile(optimizer="adam", loss="mae")
    model.optimizer.build(model.trainable_variables)  # as in training: its state is in every backup
    return model


def _backup(folder, model, epoch):
    from c3ae.train import AtomicBackupAndRestore

    callback = AtomicBackupAndRestore(str(folder))
    callback.set_model(model)
    callback.on_epoch_end(epoch)
    return callback


def test_a_full_disk_during_a_backup_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import errno

    model = _tiny_model()
    backup = tmp_path / "backup"
    _backup(backup, model, 0)
    before = (backup / "latest.weights.h5").read_bytes()
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1

    def full_disk(path, overwrite=True):
        with open(path, "wb") as handle:
            handle.write(before[: len(before) // 3])  # what h5py wrote before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    model.layers[-1].kernel.assign(np.ones((3, 1), "float32"))
    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(OSError, match="No space"):
        _backup(backup, model, 1)
    assert (backup / "latest.weights.h5").read_bytes() == before
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1
    assert sorted(p.name for p in backup.iterdir()) == ["latest.weights.h5", "training_metadata.json"]


def test_a_crash_inside_the_weights_writer_leaves_the_previous_backup(tmp_path):
    """h5py segfaulted on a full disk: the process dies mid-write, with no chance to clean up."""
    backup = tmp_path / "backup"
    code = (
        "import os, sys, keras\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_training_safety import _backup, _tiny_model\n"
        "model = _tiny_model()\n"
        "_backup(sys.argv[1], model, 0)\n"
        "def crash(path, overwrite=True):\n"
        "    open(path, 'wb').write(b'\\x89HDF\\r\\n')\n"
        "    os._exit(139)\n"
        "model.save_weights = crash\n"
        "_backup(sys.argv[1], model, 1)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code, str(backup), os.path.dirname(__file__)], env=env)
    assert done.returncode == 139
    model = _tiny_model()
    callback = _backup(tmp_path / "other", model, 0)  # any callback of a model of that shape
    callback.backup_dir = str(backup)
    callback._weights_path = str(backup / "latest.weights.h5")
    callback._training_metadata_path = str(backup / "training_metadata.json")
    callback.on_train_begin()  # loads: the backup of epoch 1 is whole
    assert model._initial_epoch == 1


def test_a_truncated_backup_stops_the_rerun_with_a_sentence(tmp_path):
    from c3ae.train import AtomicBackupAndRestore, TrainingError

    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    callback = AtomicBackupAndRestore(str(backup))
    callback.set_model(_tiny_model())
    with pytest.raises(TrainingError, match=r"cannot be read .*delete the folder .*backup to restart"):
        callback.on_train_begin()


# ------------------------------------------------------------------------------- a finished run, at once
def _finished_run(folder, config):
    folder.mkdir(parents=True)
    dump_config(config, folder / "config.yaml")
    best = {"epoch": 2, "metric": "val_age_mae", "value": 7.5}
    (folder / "summary.json").write_text(json.dumps({"family": "c3ae", "best": best}))


def test_rerunning_a_finished_train_says_so_and_loads_no_tensorflow(tmp_path, monkeypatch, capsys):
    import c3ae.cli as cli

    overrides = ["data.manifest=m.json", "train.epochs=2"]
    _finished_run(tmp_path / "run", load_config("c3ae", overrides))

    def no_tensorflow(load=False):
        assert not load, "a finished run must not load TensorFlow"

    monkeypatch.setattr(cli, "_quiet_tensorflow", no_tensorflow)
    started = time.monotonic()
    assert cli.main(["train", "c3ae", "--out", str(tmp_path / "run"), *overrides]) == 0
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    assert "holds a finished run of this config; nothing to train" in captured.err
    assert "best val_age_mae 7.5000 at epoch 2" in captured.out
    more = load_config("c3ae", ["data.manifest=m.json", "train.epochs=3"])  # more epochs: it resumes
    assert finished_summary(more.to_dict(), tmp_path / "run") is None
    assert finished_summary(load_config("c3ae", overrides).to_dict(), tmp_path / "run")["best"]["epoch"] == 2


def test_a_finished_recipe_is_recognised_stage_by_stage(tmp_path):
    from c3ae.cli import _finished_stages
    from c3ae.config import load_stages

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data: {manifest: m.json}\nstages:\n  - {name: warm, train: {epochs: 1}}\n  - {name: fine}\n"
    )
    stages = load_stages(recipe)
    out = tmp_path / "out"
    _finished_run(out / "1-warm", stages[0][1])
    assert _finished_stages(stages, out) is None
    chained = stages[1][1]
    chained.train.init_from = str(out / "1-warm" / "best.keras")  # as train_stages runs it
    _finished_run(out / "2-fine", chained)
    stages = load_stages(recipe)
    assert [s["best"]["epoch"] for s in _finished_stages(stages, out)] == [2, 2]


# --------------------------------------------------------------------------------------- Keras and fit
def test_counted_validation_sets_log_true_losses_without_running_out_of_data(tmp_path):
    """make_dataset drops unlabelled rows as it reads, so Keras cannot know a split's length: it then
    warns "Your input ran out of data" and averages each output's loss over one batch too many (a
    one-batch split showed val_age_loss at half val_age_mae)."""
    import tensorflow as tf

    from c3ae.train import with_counted_length

    model = _tiny_model()
    x = np.random.default_rng(0).random((6, 3)).astype("float32")
    rows = tf.data.Dataset.from_tensor_slices((x, np.full((6, 1), 30.0, "float32"))).batch(8)
    unknown = rows.filter(lambda *_: True)
    assert unknown.cardinality() == tf.data.UNKNOWN_CARDINALITY
    counted = with_counted_length(unknown)
    assert int(counted.cardinality()) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model.evaluate(counted, return_dict=True, verbose=0)["loss"]
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    truth = float(np.mean(np.abs(model.predict(x, verbose=0) - 30.0)))
    assert loss == pytest.approx(truth, rel=1e-5)


def test_fit_shows_steps_on_a_terminal_and_one_line_per_epoch_in_a_log():
    from c3ae.train import fit_verbosity

    class Terminal:
        def isatty(self):
            return True

    config = load_config(None)
    assert config.train.verbose is None
    assert fit_verbosity(config, Terminal()) == 1
    assert fit_verbosity(config, open(os.devnull, "w")) == 2  # noqa: SIM115 - closed with the test
    assert fit_verbosity(load_config(None, ["train.verbose=0"]), Terminal()) == 0


def test_curves_of_a_one_epoch_run_have_markers(tmp_path, monkeypatch):
    import matplotlib.axes

    from c3ae.task import plot_curves

    (tmp_path / "log.csv").write_text("epoch,loss,age_mae,val_loss,val_age_mae\n0,3.0,7.0,2.5,6.5\n")
    styles = []
    plot = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        styles.append(args[2])
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    plot_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    assert styles == ["o-", "s--", "o-", "s--"]  # loss and age MAE, train and validation: points shown
    assert (tmp_path / "curves.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ progress
class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_the_spinner_shows_each_stage_with_its_seconds_and_nothing_off_a_terminal():
    from c3ae.progress import spinner, stage

    terminal = _Terminal()
    with spinner("export m to tflite", first="loading", stream=terminal):
        with stage("converting", then="verifying"):
            time.sleep(0.3)
        time.sleep(0.3)
    assert "loading | 0 s" in terminal.text and "converting" in terminal.text and "verifying" in terminal.text
    assert terminal.text.rstrip().endswith("s") and "export m to tflite: done in 0." in terminal.text
    with stage("nobody watches"):  # no spinner: nothing happens
        pass
    log = _Terminal()
    log.isatty = lambda: False
    with spinner("export", stream=log):
        pass
    assert log.text == ""


def fake_converter(job: dict) -> dict:
    """A converter for the child process of ``c3ae.export.convert``: writes a stand-in artifact."""
    from pathlib import Path

    Path(job["output"]).write_bytes(b"TFL3")
    return {"fake": True}


def test_the_converter_child_runs_under_a_spinner(tmp_path):
    from c3ae.export.convert import convert
    from c3ae.progress import spinner

    source = tmp_path / "model.keras"
    source.write_bytes(b"not read by the fake converter")
    terminal = _Terminal()
    with spinner("export", stream=terminal):
        facts = convert(
            None,
            "tflite",
            "int8",
            tmp_path / "m.tflite",
            source=source,
            converter="test_training_safety:fake_converter",
        )
    assert facts == {"fake": True}
    assert "converting to tflite (int8) in a child process" in terminal.text
    assert "checking the artifact against Keras" in terminal.text


# ----------------------------------------------------------------------------------- command-line values
@pytest.mark.parametrize("split", ["nan,nan,nan", "inf,-inf,0", "1.5,-0.5,0", "0.8,0.1"])
def test_split_fractions_must_be_three_numbers_in_0_1_summing_to_1(split):
    from c3ae.cli import UserError, _parse_fractions

    with pytest.raises(UserError, match="must be three fractions summing to 1"):
        _parse_fractions(split)
    assert _parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)


@pytest.mark.parametrize("context", ["-1", "nan", "inf", "wide"])
def test_evaluate_refuses_a_context_that_is_not_a_width(context, capsys):
    from c3ae.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["evaluate", "m.keras", "--data", "m.json", "--context", context])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"--context: expected a number of inner-box widths >= 0, got '{context}'" in err
