"""Files that come from anywhere are refused in one sentence, never a traceback, never followed.

Model files (``.keras`` configs with foreign classes or absurd sizes, ``.tflite`` / ``.onnx`` graphs that
are not c3ae models, impossible preprocessing values), tampered bundle folders (``reference.py`` checks
its own ``bundle.json``), label CSVs and manifests. Each message names the file, the key and what it may be.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from c3ae.bundled import WEIGHTS_DIR
from c3ae.cli import main
from c3ae.errors import DataError

OBAMA = REPO / "assets" / "obama.jpg"


def _one_sentence(capsys, code: int, *fragments: str) -> str:
    """The CLI's stderr: one line holding ``fragments``, no traceback; ``code`` the exit status it gave."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --------------------------------------------------------------------------------------------- .keras
def _keras_with(tmp_path: Path, change, name: str = "hostile.keras") -> Path:
    """The shipped c3ae-utk.keras with its config.json changed by ``change(config)``."""
    with zipfile.ZipFile(WEIGHTS_DIR / "c3ae-utk.keras") as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    config = json.loads(entries["config.json"])
    change(config)
    entries["config.json"] = json.dumps(config).encode()
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        for file, content in entries.items():
            archive.writestr(file, content)
    return path


def _popen(config):
    config.update(module="subprocess", class_name="Popen", registered_name=None)


def _sequential(config):
    config.clear()
    layer = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 3}, "registered_name": None}
    config.update(module="keras", class_name="Sequential", config={"layers": [layer]}, registered_name=None)


def _option(key, value):
    return lambda config: config["config"]["options"].__setitem__(key, value)


def _chip(key, value):
    return lambda config: config["config"].__setitem__("preprocessing", {"chip": {key: value}})


KERAS_CASES = {
    "a class path such as subprocess.Popen": (_popen, ["is not a c3ae model", "subprocess.Popen"]),
    "a foreign graph": (_sequential, ["is not a c3ae model", "keras.Sequential"]),
    "filters=10**9": (_option("filters", 10**9), ["option filters is 1000000000", "from 1 to 512"]),
    "an infinite dropout": (_option("dropout", float("inf")), ["option dropout", "from 0 to 1"]),
    "a text option of 10,000 characters": (_option("activation", "x" * 10_000), ["option activation"]),
    "an unknown family": (lambda c: c["config"].__setitem__("family", "resnet"), ["family 'resnet'"]),
    "a chip of 10**9 pixels": (_chip("size", 10**9), ["preprocessing.chip.size", "from 16 to 1024"]),
    "a negative context": (_chip("context", -1), ["preprocessing.chip.context", "from 0 to 10"]),
}


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_a_hostile_keras_file_is_refused_in_one_sentence(case, tmp_path, capsys):
    pytest.importorskip("keras")
    from c3ae.bundled import ModelNotFoundError, load_model

    change, fragments = KERAS_CASES[case]
    path = _keras_with(tmp_path, change)
    with pytest.raises(ModelNotFoundError) as error:
        load_model(path)
    assert all(fragment in str(error.value) for fragment in fragments), error.value
    code = main(["predict", str(OBAMA), "--model", str(path), "--backend", "keras"])
    _one_sentence(capsys, code, str(path), *fragments)


def test_a_keras_file_that_is_not_an_archive_is_refused(tmp_path):
    pytest.importorskip("keras")
    from c3ae.bundled import ModelNotFoundError, load_model

    path = tmp_path / "junk.keras"
    path.write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(ModelNotFoundError, match="not a .keras archive with a readable config.json"):
        load_model(path)


# ------------------------------------------------------------------------------------- .tflite / .onnx
def _foreign_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64, 64, 3])
    age = helper.make_tensor_value_info("age", TensorProto.FLOAT, [None, 64, 64, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["age"])], "g", [x], [age])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _tflite_described(tmp_path: Path, change) -> Path:
    """A copy of the shipped c3ae-utk.tflite whose c3ae description is changed by ``change``."""
    from c3ae.export.metadata import add_tflite_metadata, read_tflite_metadata

    data = (WEIGHTS_DIR / "c3ae-utk.tflite").read_bytes()
    description = read_tflite_metadata(data)
    change(description)
    path = tmp_path / "tampered.tflite"
    path.write_bytes(add_tflite_metadata(data, description))
    return path


def test_tflite_and_onnx_files_that_are_not_c3ae_models_are_refused(tmp_path, capsys):
    from c3ae.runtime import BackendError, load_backend

    pnet = tmp_path / "pnet.tflite"
    shutil.copyfile(WEIGHTS_DIR / "mtcnn" / "pnet.tflite", pnet)  # a real TFLite model, not ours
    for path in (pnet, _foreign_onnx(tmp_path / "relu.onnx")):
        with pytest.raises(BackendError, match="is not a c3ae model"):
            load_backend(path)
        code = main(["predict", str(OBAMA), "--model", str(path)])
        _one_sentence(capsys, code, str(path), "is not a c3ae model")


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda d: d["preprocessing"]["chip"].__setitem__("size", 10**9), ["chip.size", "from 16 to 1024"]),
        (lambda d: d["preprocessing"]["chip"].__setitem__("context", "wide"), ["chip.context", "a number"]),
        (lambda d: d.__setitem__("preprocessing", ["x"]), ["preprocessing description is not a table"]),
        (lambda d: d["model_info"].__setitem__("family", "resnet"), ["names no known model family"]),
        (lambda d: d["model_info"].__setitem__("inputs", ["image"]), ["is not the model its description"]),
    ],
)
def test_a_tflite_file_with_an_impossible_description_is_refused(change, fragments, tmp_path, capsys):
    from c3ae.runtime import BackendError, load_backend

    path = _tflite_described(tmp_path, change)
    with pytest.raises(BackendError) as error:
        load_backend(path)
    assert all(fragment in str(error.value) for fragment in fragments), error.value
    _one_sentence(capsys, main(["predict", str(OBAMA), "--model", str(path)]), *fragments)


def test_a_foreign_tflite_given_to_export_bundle_is_refused_in_one_sentence(tmp_path, capsys):
    pnet = tmp_path / "pnet.tflite"
    shutil.copyfile(WEIGHTS_DIR / "mtcnn" / "pnet.tflite", pnet)
    code = main(["export", str(pnet), "--bundle", str(tmp_path / "bundle")])
    _one_sentence(capsys, code, "is not a c3ae model")
    assert not (tmp_path / "bundle").exists()


# ----------------------------------------------------------------------------------------------- bundle
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from c3ae.export.bundle import write_bundle

    folder = tmp_path_factory.mktemp("bundle") / "c3ae-utk"
    write_bundle("c3ae-utk", folder)
    return folder


def _reference(folder: Path):
    spec = importlib.util.spec_from_file_location(f"reference_{id(folder)}", folder / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tampered(bundle: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "tampered"
    shutil.copytree(bundle, folder)
    spec = json.loads((folder / "bundle.json").read_text())
    change(spec)
    (folder / "bundle.json").write_text(json.dumps(spec))
    return folder


def _set(path: str, value):
    def change(spec):
        *parents, last = path.split(".")
        for part in parents:
            spec = spec[part]
        spec[last] = value

    return change


BUNDLE_CASES = {
    "a pyramid factor of 1.0 (divides by zero)": (
        _set("detector.pyramid.factor", 1.0),
        "detector.pyramid.factor is 1.0; it must be a number from 0.1 to 0.9",
    ),
    "a pyramid factor of 0.9999 (runs for minutes)": (
        _set("detector.pyramid.factor", 0.9999),
        "detector.pyramid.factor is 0.9999",
    ),
    "a detector path of ../../etc/passwd": (
        _set("detector.files.pnet", "../../etc/passwd"),
        "detector.files.pnet is '../../etc/passwd'; it must name a file inside the bundle",
    ),
    "an absolute model path": (
        lambda spec: spec["models"][0].__setitem__("file", "/etc/passwd"),
        "models[0].file is '/etc/passwd'",
    ),
    "a chip of 10**9 pixels": (
        _set("alignment.chip.size", 10**9),
        "alignment.chip.size is 1000000000; it must be an integer from 16 to 1024",
    ),
    "a min_face of 0": (_set("detector.min_face", 0), "detector.min_face is 0"),
    "an NMS method of its own": (_set("detector.nms.rnet", [0.7, "max"]), "detector.nms.rnet must be"),
    "no pyramid": (lambda spec: spec["detector"].pop("pyramid"), "bundle.json has no detector.pyramid"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_the_bundle_reference_refuses_a_tampered_bundle_json(case, bundle, tmp_path):
    change, message = BUNDLE_CASES[case]
    folder = _tampered(bundle, tmp_path, change)
    reference = _reference(folder)
    with pytest.raises(reference.BundleError) as error:
        reference.read_spec(folder)
    assert message in str(error.value)


def test_the_bundle_reference_reads_its_own_bundle_and_says_one_sentence_for_a_tampered_one(bundle, tmp_path):
    assert _reference(bundle).read_spec(bundle)["model"] == "c3ae-utk"  # an untouched bundle passes
    folder = _tampered(bundle, tmp_path, _set("detector.pyramid.factor", 1.0))
    command = [sys.executable, str(folder / "reference.py"), str(OBAMA)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "reference.py: bundle.json: detector.pyramid.factor is 1.0; it must be a number from 0.1 to 0.9."
    ]


# ------------------------------------------------------------------------------------ CSV and manifests
def test_a_label_csv_without_an_age_column_is_refused(tmp_path):
    from c3ae.preprocessing.readers import scan_dataset

    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("photo,years\nx.jpg,30\n")
    with pytest.raises(DataError, match="needs an 'age' column"):
        scan_dataset("csv", tmp_path)


def test_a_binary_label_csv_is_one_sentence(tmp_path, capsys):
    from c3ae.preprocessing.readers import scan_dataset

    root = tmp_path / "data"
    root.mkdir()
    (root / "labels.csv").write_bytes((WEIGHTS_DIR / "c3ae-utk.tflite").read_bytes()[:4000])
    with pytest.raises(DataError, match="is not a UTF-8 text file"):
        scan_dataset("csv", root)
    code = main(["preprocess", "--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "out")])
    _one_sentence(capsys, code, "labels.csv is not a UTF-8 text file")


def _manifest(folder: Path, **changes) -> Path:
    manifest = {
        "format": "c3ae-manifest",
        "version": 1,
        "face_pipeline": {"chip": {"size": 160, "face_width": 0.4}},
        "columns": ["image", "age", "gender"],
        "shards": [{"file": "train-00000.feather", "split": "train", "rows": 1}],
    }
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shards": [{"file": "", "split": "train"}]}, "is not a file name"),
        ({"shards": [{"file": "a.feather", "split": ["train"]}]}, "a split is a name"),
        ({"columns": "image,age"}, "columns must be a list of column names"),
        ({"face_pipeline": {"chip": {"size": 10**9}}}, "chip.size is 1000000000"),
    ],
)
def test_a_manifest_with_impossible_entries_is_refused(changes, message, tmp_path):
    from c3ae.data import read_manifest

    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_manifest(_manifest(tmp_path, **changes))


def test_a_binary_manifest_is_one_sentence(tmp_path):
    from c3ae.records import Manifest

    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not UTF-8"):
        Manifest.from_json(tmp_path / "manifest.json")
    assert Manifest.from_json(_manifest(tmp_path))["version"] == 1  # a sound one passes
