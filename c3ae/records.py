"""Typed records of the JSON files c3ae writes and reads.

- :class:`ModelCard`: ``c3ae/weights/<name>.json``, written by ``c3ae publish``.
- :class:`ExportReport`: ``<artifact>.report.json``, written by ``c3ae export``.
- :class:`VideoSummary`: what :func:`c3ae.video.process_video` returns (the last ``--jsonl`` line).
- :class:`Manifest` (with its :class:`Shard` entries): ``manifest.json``, written by ``c3ae preprocess``.

Each is a dataclass with one reader, ``from_json`` (a file, JSON text or a dict), and ``to_dict`` /
``to_json``, which give the file's layout key for key: the fields in their order, an optional field
(default ``None``) only when it is set, then every key the record does not name, kept in ``extra`` so that a
file from another c3ae version loses nothing. A record also reads like the dict it is written as
(``record["key"]``, ``"key" in record``, ``record == a_dict``), so code written against the dicts keeps
working; new code uses the attributes.

Imports neither TensorFlow nor Keras nor NumPy: the runtime install reads model cards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from c3ae.errors import DataError

R = TypeVar("R", bound="Record")

REPORT_SUFFIX = ".report.json"
FAILED_SUFFIX = ".failed"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "c3ae-manifest"
MANIFEST_VERSION = 1


def _plain(value: Any) -> Any:
    """``value`` as JSON data: records as their dicts, containers copied (so nothing is shared)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _json_value(value: Any) -> Any:
    """``json.dumps``'s fallback: NumPy scalars and arrays by ``tolist()``, anything else as text."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


def _json_object(data: str | Path | Mapping[str, Any], file_name: str | None) -> tuple[str, dict]:
    """(what to name in errors, the JSON object) of a dict, a JSON text, a file or a folder holding
    ``file_name``."""
    if isinstance(data, Mapping):
        return "the dict", _plain(data)
    if isinstance(data, str) and data.lstrip()[:1] in ("{", "["):  # JSON text, not a file name
        where, text = "the JSON text", data
    else:
        path = Path(data)
        if file_name and path.is_dir():
            path = path / file_name
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not a JSON text: it is not UTF-8 (a binary file?).") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where} is not valid JSON ({error}).") from error
    if not isinstance(value, dict):
        raise DataError(f"{where} holds {type(value).__name__}, not a JSON object.")
    return where, value


@functools.cache
def _layout(cls: type) -> dict[str, bool]:
    """``{name: optional}`` of a record's fields in file order, ``extra`` left out (do not change it)."""
    return {f.name: f.default is None for f in dataclasses.fields(cls) if f.name != "extra"}


class Record(Mapping):
    """Base of the records: :meth:`from_json`, :meth:`to_dict`, :meth:`to_json` and the read-only dict
    interface. Subclasses are ``kw_only`` dataclasses with ``eq=False`` (equality is the dict's) that end
    with ``extra: dict = field(default_factory=dict)``."""

    KIND: ClassVar[str] = "record"  # names the record in errors
    FILE_NAME: ClassVar[str | None] = None  # the file a folder holds, for from_json(folder)
    NESTED: ClassVar[dict[str, type[Record]]] = {}  # fields holding a list of records

    extra: dict[str, Any]

    @classmethod
    def from_json(cls: type[R], data: str | Path | Mapping[str, Any]) -> R:
        """The record of a JSON file (or a folder holding ``FILE_NAME``), a JSON text or a dict. Raises
        :class:`c3ae.errors.DataError` for what is not JSON or lacks a required key."""
        where, values = _json_object(data, cls.FILE_NAME)
        layout = _layout(cls)
        missing = [name for name, optional in layout.items() if not optional and name not in values]
        if missing:
            raise DataError(f"{where} is not a {cls.KIND}: it lacks {', '.join(missing)}.")
        known = {key: value for key, value in values.items() if key in layout}
        for name, kind in cls.NESTED.items():
            if isinstance(known.get(name), list):
                known[name] = [kind.from_json(item) for item in known[name]]
        return cls(**known, extra={key: value for key, value in values.items() if key not in layout})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the file's key order (a copy: changing it changes nothing here)."""
        return {key: _plain(self[key]) for key in self}

    def to_json(self, indent: int | None = 2) -> str:
        """The file's text: :meth:`to_dict` as JSON with ``indent``, ending in a newline."""
        return json.dumps(self.to_dict(), indent=indent, default=_json_value) + "\n"

    def _keys(self) -> list[str]:
        """The keys written: every required field, the optional ones that are set, then ``extra``'s."""
        layout = _layout(type(self))
        written = [
            name for name, optional in layout.items() if not optional or getattr(self, name) is not None
        ]
        return [*written, *self.extra]

    def __getitem__(self, key: str) -> Any:
        layout = _layout(type(self))
        if key not in layout:
            return self.extra[key]
        value = getattr(self, key)
        if value is None and layout[key]:
            raise KeyError(key)  # an optional field that is not set is not written
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


# ------------------------------------------------------------------------------------------- model card
@dataclass(frozen=True, eq=False, kw_only=True)
class ModelCard(Record):
    """A bundled model's card: what it was trained on and how, and how well it does.

    ``metrics`` maps the evaluated split to its metrics (ages in years; several sources give
    ``{"sources": {name: metrics}, "mean": metrics}``) and ``best_validation`` to the run's best epoch;
    ``training.seconds`` is wall-clock seconds.
    """

    KIND: ClassVar[str] = "model card"

    name: str
    c3ae_version: str
    family: str | None
    parameters: int
    inputs: dict[str, list[int | None]]
    outputs: list[str]
    input_convention: str
    data: dict[str, Any]
    split: dict[str, Any]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    cross_source: dict[str, Any] | None = None
    recipe: dict[str, str] | None = None
    training: dict[str, Any]
    license: str
    # a distilled model's teacher: {"name", "package", "files": {file: sha256}, "metrics": {split: ...}},
    # its metrics laid out as ``metrics`` (per source and their mean) on the same faces
    teacher: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chip(self) -> dict[str, Any] | None:
        """The chip geometry the model was trained with (``ChipSpec.to_dict()``), or None."""
        chip = (self.preprocessing or {}).get("chip")
        return chip if isinstance(chip, dict) else None

    @property
    def context(self) -> float:
        """The visible window (``ChipSpec.context``, in inner-box widths) the model was trained with."""
        return float((self.chip or {}).get("context", 0.0) or 0.0)

    @property
    def trained_on(self) -> str:
        """The dataset, or the sources' names joined by ``+``."""
        data = self.data or {}
        if "sources" in data:
            return "+".join(str(source["name"]) for source in data["sources"])
        return str(data.get("dataset", ""))

    def headline(self, split: str | None = None) -> dict[str, Any]:
        """The metrics of ``split`` (default: the one the card evaluated); the mean over sources for
        several sources."""
        split = split or (self.split or {}).get("evaluated", "test")
        metrics = (self.metrics or {}).get(split) or {}
        return metrics.get("mean", metrics)

    def __str__(self) -> str:
        split = (self.split or {}).get("evaluated", "test")
        headline = self.headline(split)
        mean = " (mean over sources)" if "mean" in ((self.metrics or {}).get(split) or {}) else ""
        return (
            f"{self.name}: {self.parameters:,} parameters, {split} MAE {headline.get('mae')}, "
            f"gender accuracy {headline.get('gender_accuracy')}{mean}"
        )


# ---------------------------------------------------------------------------------------- export report
def report_path(output: str | Path) -> Path:
    """Where the export of ``output`` writes its report: ``<output>.report.json``."""
    output = Path(output)
    return output.with_name(output.name + REPORT_SUFFIX)


@dataclass(eq=False, kw_only=True)
class ExportReport(Record):
    """The report of one export: the artifact, its verification against Keras and the time it took.

    ``status`` is ``"passed"`` or ``"failed"`` (an artifact that failed is kept as
    ``<output>.failed``, named by ``artifact``). ``size_bytes`` is bytes on disk; ``seconds`` holds
    ``convert`` and ``verify`` wall-clock seconds; ``verification`` the checks (``check``, ``value``,
    ``limit`` or ``minimum``, ``passed``), the crops they ran on and the runtime. Filled stage by stage
    (convert, verify, publish), hence not frozen.
    """

    KIND: ClassVar[str] = "export report"

    status: str
    artifact: str
    format: str
    quantisation: str
    model: dict[str, Any]
    inputs: dict[str, list[int | None]]
    outputs: list[str]
    weight_bytes: dict[str, int] | None = None  # TFLite: bytes of weights per dtype
    float_ops: dict[str, int] | None = None  # TFLite int8: ops left in float, with their counts
    opset: int | None = None  # ONNX
    size_bytes: int | None = None
    calibration: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    seconds: dict[str, float] | None = None
    error: str | None = None
    c3ae_version: str | None = None
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the fields ``values`` names (a converter's facts); other keys go to ``extra``."""
        for key, value in values.items():
            if key in _layout(type(self)):
                setattr(self, key, value)
            else:
                self.extra[key] = value

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def report_file(self) -> Path:
        """Where this report is written: next to the requested output, also for a failed artifact."""
        return report_path(self.artifact.removesuffix(FAILED_SUFFIX))

    def _check_summary(self) -> str:
        """The numeric checks on one line: ``name value <= limit`` (or ``>= minimum``)."""
        return "; ".join(
            f"{c['check']} {c['value']:.3g} >= {c['minimum']:.3g}"
            if "minimum" in c
            else f"{c['check']} {c['value']:.3g} <= {c['limit']:.3g}"
            for c in (self.verification or {}).get("checks", [])
            if isinstance(c["value"], float)
        )

    def _verification_lines(self) -> list[str]:
        verification = self.verification or {}
        if not verification.get("crops"):
            return [f"verified: {verification.get('runtime')}"]
        lines = [f"verified on {verification['crops']} crops from {verification['data']}"]
        lines.append(f"  {self._check_summary()}")
        if "xnnpack" in verification:
            lines.append("  runs on LiteRT's default XNNPACK delegate (as phones run it)")
        lines += [f"  warning: {warning}" for warning in verification.get("warnings", [])]
        if verification.get("constant_layers"):
            lines.append(
                "  warning: these layers output the same value for every crop (dead units): "
                + ", ".join(verification["constant_layers"])
            )
        return lines

    def __str__(self) -> str:
        """The human summary ``c3ae export`` prints: the artifact, what verification ran on, the report."""
        if self.error is not None:
            lines = [f"{self.format} ({self.quantisation}) export failed: {self.error}"]
        else:
            size = f"{self.size_bytes / 1024:.1f} KB, " if self.size_bytes is not None else ""
            lines = [f"wrote {self.artifact} ({size}{self.format} {self.quantisation})"]
            if not self.passed:
                lines.append("verification FAILED: the artifact is kept only for inspection")
        if self.float_ops is not None:
            left = ", ".join(f"{op} x{n}" for op, n in self.float_ops.items()) or "none"
            lines.append(f"ops left in float by int8 quantisation: {left}")
        if self.verification is not None:
            lines += self._verification_lines()
        lines.append(f"report: {self.report_file}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- video summary
@dataclass(frozen=True, eq=False, kw_only=True)
class VideoSummary(Record):
    """What :func:`c3ae.video.process_video` did: frames written, face tracks, speed, per-stage timings.

    ``fps`` is frames per second of processing (start-up excluded; None when nothing was timed),
    ``input_fps`` the stream's frame rate, ``seconds`` wall-clock seconds; ``stages`` maps each stage to
    its ``seconds``, ``ms_per_frame`` and ``calls``. ``output`` is the annotated video, None when none was
    kept.
    """

    KIND: ClassVar[str] = "video summary"

    frames: int
    input_frames: int | None
    broken_frames: int
    missing_frames: int
    interrupted: bool
    faces: int
    face_boxes: int
    detection_frames: int
    scene_cuts: int
    fps: float | None
    input_fps: float
    seconds: float
    stages: dict[str, dict[str, float]]
    output: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def stage_table(self) -> str:
        """A small table of the per-stage timings (milliseconds per frame, seconds, calls)."""
        rows = [f"{'stage':<9} {'ms/frame':>9} {'seconds':>9} {'calls':>6}"]
        for stage, value in self.stages.items():
            rows.append(
                f"{stage:<9} {value['ms_per_frame']:>9.2f} {value['seconds']:>9.3f} {value['calls']:>6}"
            )
        rows.append(f"{'total':<9} {1000 / self.fps if self.fps else 0:>9.2f} {self.seconds:>9.3f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        """The line ``c3ae video`` prints: frames, speed, tracks, and what went wrong on the way."""
        notes = []
        if self.broken_frames:
            notes.append(f"{self.broken_frames} broken frame(s) skipped")
        if self.missing_frames:
            notes.append(f"the stream ended {self.missing_frames} frame(s) early (truncated?)")
        if self.interrupted:
            notes.append("interrupted; the output is complete up to there")
        return (
            f"{self.frames} frames at {self.fps or 0:.1f} fps, {self.faces} face track(s)"
            + (f"; {'; '.join(notes)}" if notes else "")
            + (f"; output: {self.output}" if self.output else "")
        )


# ------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True, eq=False, kw_only=True)
class Shard(Record):
    """One Feather shard of a manifest: its file (relative to the manifest's folder), split and rows."""

    KIND: ClassVar[str] = "manifest shard"

    file: str
    split: str
    rows: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        file = self.file
        if not isinstance(file, str) or not file.strip() or "\x00" in file:
            raise DataError(
                f"The manifest shard file {file!r:.80} is not a file name; run 'c3ae preprocess' again."
            )
        if not isinstance(self.split, str) or not self.split or len(self.split) > 40:
            raise DataError(f"The manifest shard {file} has the split {self.split!r:.40}; a split is a name.")


@dataclass(frozen=True, eq=False, kw_only=True)
class Manifest(Record):
    """A preprocessed dataset: its shards, the face pipeline that cut them, the split and the counts.

    ``format`` is ``"c3ae-manifest"``; ``root`` the dataset's folder when preprocessed; ``created`` UTC
    ISO 8601; ``timing`` holds wall-clock seconds (``wall_time_s``, ``processing_s``) and ``faces_per_s``.
    """

    KIND: ClassVar[str] = "c3ae manifest"
    FILE_NAME: ClassVar[str | None] = MANIFEST_NAME
    NESTED: ClassVar[dict[str, type[Record]]] = {"shards": Shard}

    format: str
    version: int
    c3ae_version: str | None = None
    dataset: str | None = None
    root: str | None = None
    created: str | None = None
    face_pipeline: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    rejects: dict[str, int] | None = None
    columns: list[str] | None = None
    shards: list[Shard]
    timing: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        """Refuse (DataError, one sentence naming the key) columns that are not names and a face pipeline
        whose chip is outside ``c3ae.export.metadata.CHIP_RANGES``: the crops are cut with it."""
        if self.columns is not None and not (
            isinstance(self.columns, list) and all(isinstance(c, str) for c in self.columns)
        ):
            raise DataError(
                f"The manifest's columns must be a list of column names, not {self.columns!r:.60}."
            )
        if self.face_pipeline is not None:
            from c3ae.export.metadata import ForeignModelError, check_chip

            if not isinstance(self.face_pipeline, Mapping):
                raise DataError("The manifest's face_pipeline must be a table of settings.")
            try:
                check_chip(self.face_pipeline.get("chip"), "the manifest's face_pipeline")
            except ForeignModelError as error:
                raise DataError(str(error)) from None

    def __str__(self) -> str:
        """What ``c3ae preprocess`` prints: kept and rejected photos per split, and the speed."""
        counts, timing = self.counts or {}, self.timing or {}
        rejects = ", ".join(f"{reason} {n}" for reason, n in (self.rejects or {}).items()) or "none"
        lines = [
            f"kept {counts.get('kept', 0)} of {counts.get('files_scanned', 0)} files "
            f"({100 * counts.get('kept_fraction', 0.0):.1f}%): "
            + ", ".join(f"{split} {n}" for split, n in counts.get("by_split", {}).items()),
            f"rejected: {rejects}",
        ]
        processed = (self.split or {}).get("processed")
        if processed and len(processed) < 3:
            lines[0] += f" (only the {' and '.join(processed)} split was processed)"
        if timing.get("faces_per_s"):
            lines.append(
                f"processed {timing['processed_samples']} photos in {timing['processing_s']} s "
                f"({timing['faces_per_s']} photos/s, {timing['workers']} workers)"
            )
        return "\n".join(lines)
