"""train.strategy=multiworker: two real worker processes on 127.0.0.1 train in lockstep, and resume.

MultiWorkerMirroredStrategy must be created before any other TensorFlow op of its process, so the workers
are fresh subprocesses (never this pytest process), killed on a timeout.
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from test_data import build_tiny_manifest

from c3ae.config import load_config
from c3ae.distributed import ClusterInfo, TFConfigError, parse_tf_config, train_multiworker

pytestmark = pytest.mark.slow  # trains, converts or installs: `pytest -m 'not slow'` skips it

WORKERS = 2
RUN_TIMEOUT = 240  # seconds for a whole cluster run; a run takes ~30 s on 2 busy cores

# One worker: records the initial weights (from inside the strategy scope), trains, dumps the final ones.
WORKER_SCRIPT = r"""
import json, sys

import numpy as np
import tensorflow as tf

# Two workers share the test machine's cores: small thread pools (set before the strategy starts TF).
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)

import c3ae.distributed as distributed
from c3ae.config import load_config

index, out, overrides = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])


def dump(model, path):
    names = [f"{i:03d}:{w.path.replace('/', '.')}" for i, w in enumerate(model.weights)]
    np.savez(path, **dict(zip(names, model.get_weights(), strict=True)))


build = distributed.build_model


def recording_build(config):
    model = build(config)
    dump(model, f"{out}/initial{index}.npz")
    return model


distributed.build_model = recording_build
summary, model = distributed.fit_multiworker(load_config(None, overrides), out)
dump(model, f"{out}/worker{index}.npz")
with open(f"{out}/worker{index}.json", "w") as handle:
    json.dump(summary, handle)
"""


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_cluster(out, overrides, logs, timeout=RUN_TIMEOUT) -> list[dict]:
    """Run WORKERS worker processes to completion; fail (after killing them all) on a timeout or error."""
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    temporary = logs / "tmp"  # the workers' TMPDIR: non-chief checkpoint folders must be gone afterwards
    temporary.mkdir(exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(WORKERS)]}
    processes, files = [], []
    try:
        for index in range(WORKERS):
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "CUDA_VISIBLE_DEVICES": "-1",  # CPU collectives over gRPC, even on a machine with GPUs
                "TMPDIR": str(temporary),
            }
            log = open(logs / f"worker{index}.log", "w")  # closed in finally
            files.append(log)
            command = [sys.executable, "-c", WORKER_SCRIPT, str(index), str(out), json.dumps(overrides)]
            processes.append(
                subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in files:
            log.close()
    codes = [process.returncode for process in processes]
    if codes != [0] * WORKERS:
        tails = "\n".join(
            f"--- worker {i} (exit {code}):\n" + (logs / f"worker{i}.log").read_text()[-3000:]
            for i, code in enumerate(codes)
        )
        pytest.fail(f"worker exit codes {codes} (negative: killed after {timeout} s)\n{tails}")
    assert list(temporary.iterdir()) == [], "a non-chief worker left its checkpoint folder behind"
    return [json.loads((out / f"worker{i}.json").read_text()) for i in range(WORKERS)]


def overrides_for(manifest, epochs: int) -> list[str]:
    return [
        f"data.manifest={manifest}",
        "data.batch_size=4",  # per worker: a step consumes 8 rows
        "data.augment=false",
        "model.name=ssrnet",
        "model.options={p_activation: softmax, clamp_output: true}",
        f"train.epochs={epochs}",
        "train.steps_per_epoch=3",
        "train.lr=0.001",
        "train.schedule=constant",
        "train.verbose=0",
    ]


def load_weights(path) -> dict:
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def assert_same_weights(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def logged_epochs(out) -> list[int]:
    with open(out / "log.csv") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_tiny_manifest(tmp_path_factory.mktemp("tiny"))["manifest"]


@pytest.fixture(scope="module")
def two_epochs(manifest, tmp_path_factory):
    """A 2-worker run of 2 epochs x 3 steps; (out folder, summaries, seconds)."""
    root = tmp_path_factory.mktemp("multiworker")
    started = time.monotonic()
    summaries = run_cluster(root / "out", overrides_for(manifest, epochs=2), root / "logs")
    return root / "out", summaries, time.monotonic() - started


def test_workers_train_in_lockstep(two_epochs):
    out, summaries, _seconds = two_epochs
    initial = [load_weights(out / f"initial{i}.npz") for i in range(WORKERS)]
    final = [load_weights(out / f"worker{i}.npz") for i in range(WORKERS)]
    assert_same_weights(initial[0], initial[1])  # the strategy broadcasts the chief's initial values
    # Every array, BatchNormalization moving statistics included (synchronized BN), is the same everywhere.
    assert_same_weights(final[0], final[1])
    changed = [name for name in final[0] if not np.array_equal(final[0][name], initial[0][name])]
    assert len(changed) == len(final[0]), sorted(set(final[0]) - set(changed))
    moving = [name for name in final[0] if "moving_" in name]
    assert moving and all(name in changed for name in moving)

    assert [s["worker_index"] for s in summaries] == [0, 1]
    for summary in summaries:
        assert summary["num_workers"] == 2 and summary["global_batch_size"] == 8
        assert summary["steps_per_epoch"] == 3 and summary["epochs_run"] == 2
        assert summary["synchronized_batch_norm_layers"] > 0 and summary["stopped"] is None
    assert summaries[0]["final"] == summaries[1]["final"]  # all-reduced values: identical
    assert summaries[0]["best"] == summaries[1]["best"]
    assert summaries[0]["best"]["metric"] == "val_mae"


def test_only_the_chief_writes_the_run_folder(two_epochs):
    import keras

    import c3ae.models.base  # noqa: F401 - registers FamilyModel, which the .keras files hold

    out, summaries, _seconds = two_epochs
    assert logged_epochs(out) == [0, 1]
    for name in ("best.keras", "last.keras", "best.json", "config.yaml", "curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert (out / "backup" / "checkpoint").is_file()
    assert json.loads((out / "summary.json").read_text())["worker_index"] == 0
    model = keras.saving.load_model(out / "last.keras", safe_mode=True, compile=False)
    assert model.count_params() == summaries[0]["parameters"]
    layers = [
        layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert layers and not any(layer.synchronized for layer in layers)  # saved as plain BN
    final = load_weights(out / "worker0.npz")
    assert_same_weights(dict(zip(final, model.get_weights(), strict=True)), final)


def test_a_rerun_continues_from_the_last_finished_epoch(two_epochs, manifest, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_epochs[0], out)
    summaries = run_cluster(out, overrides_for(manifest, epochs=3), tmp_path / "logs")
    assert [(s["initial_epoch"], s["epochs_run"]) for s in summaries] == [(2, 1), (2, 1)]
    assert logged_epochs(out) == [0, 1, 2]
    assert_same_weights(load_weights(out / "worker0.npz"), load_weights(out / "worker1.npz"))


# ------------------------------------------------------------------------------------------------ TF_CONFIG
def test_tf_config_is_parsed():
    text = json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    )
    info = parse_tf_config(text)
    assert info == ClusterInfo((), ("127.0.0.1:1", "127.0.0.1:2"), "worker", 1)
    assert (info.num_workers, info.worker_index, info.is_chief) == (2, 1, False)
    text = json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    )
    assert (parse_tf_config(text).worker_index, parse_tf_config(text).is_chief) == (1, False)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "TF_CONFIG is not set"),
        ("", "TF_CONFIG is not set"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "lists no worker"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "'ps'"),
        ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "twice"),
        ('{"cluster": {"worker": ["a:1"]}}', 'no "task"'),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}', "task.type"),
        ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "task.index"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}', "task.index"),
    ],
)
def test_missing_or_malformed_tf_config_is_a_clear_value_error(value, message, monkeypatch, tmp_path):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    # Checked first, before the manifest is read or TensorFlow touched.
    with pytest.raises(ValueError, match=message) as caught:
        train_multiworker(load_config(None, ["data.manifest=nowhere.json"]), tmp_path / "out")
    assert isinstance(caught.value, TFConfigError)


# ------------------------------------------------------------------------------------- losses, in-process
FAMILIES = {
    "c3ae": ["model.name=c3ae", "model.options={gender: true}"],  # KL + MAE + masked BCE
    "c3ae-focal": ["model.name=c3ae", "model.options={gender: true}", "loss.bins_loss=focal"],
    "ssrnet-gender": [
        "model.name=ssrnet",
        "model.options={V: 1.0, p_activation: softmax, clamp_output: true}",
    ],
    "dldl": ["model.name=dldl", "model.options={gender: true, width: 8}"],
    "levi_hassner": ["model.name=levi_hassner", "model.options={fc_units: [16]}", "data.input_size=64"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_replica_loss_is_the_compiled_keras_loss(family, manifest, tmp_path):
    """One worker, no strategy: the loop's loss of a batch (unknown genders included, as sample weights of 0)
    is model.fit's, and its metrics are the compiled Keras metrics'."""
    import tensorflow as tf

    from c3ae.data import make_dataset, read_manifest
    from c3ae.distributed import _MultiWorkerRun
    from c3ae.task import mean_over_labelled, metrics_for

    config = load_config(None, [f"data.manifest={manifest}", "data.batch_size=8", *FAMILIES[family]])
    cluster = ClusterInfo((), ("127.0.0.1:1",), "worker", 0)
    run = _MultiWorkerRun(config, tmp_path, cluster, tf.distribute.get_strategy(), read_manifest(manifest))
    try:
        model = run.model
        dataset = make_dataset(run.manifest, "train", augment=False, shuffle=False, **run._common())
        inputs, targets, weights = next(iter(run._unwrap(dataset)))
        if "gender" in targets:
            unknown = targets["gender"].numpy().ravel() == -1
            assert unknown.any() and not weights["gender"].numpy()[unknown].any()  # unknown labels weigh 0
        predictions = model(inputs, training=False)
        ours, states = run._batch_terms(targets, predictions, weights, in_replica=True)
        fit_weights = mean_over_labelled(weights)
        keras_loss = model.compute_loss(
            x=inputs, y=targets, y_pred=predictions, sample_weight=fit_weights, training=False
        )
        np.testing.assert_allclose(float(ours), float(keras_loss), rtol=1e-5)
        ours = run._metrics({key: float(value) for key, value in states.items()}, "")
        compiled = metrics_for(model)
        for name, metrics in compiled.items():
            for metric in metrics:
                metric.update_state(targets[name], predictions[name])
                key = metric.name if len(compiled) == 1 else f"{name}_{metric.name}"
                np.testing.assert_allclose(ours[key], float(metric.result()), rtol=1e-6)
    finally:
        run.close()
