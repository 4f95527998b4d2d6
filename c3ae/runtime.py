"""Inference backends with one interface: Keras, TFLite (LiteRT) and ONNX Runtime.

Every backend takes float32 BGR crops with raw pixels in [0, 255] (see ``c3ae.conventions``), shape
(N, S, S, 3) with any N >= 1, as a dict named like the model's inputs (``outer``/``middle``/``inner`` or
``image``), and returns float32 numpy arrays named like its outputs (``age`` (N, 1) years, ``gender``
(N, 1) P(male), ``age_bins`` (N, 12), ...).

>>> backend = load_backend("c3ae-utk", "tflite", threads=1)       # doctest: +SKIP
>>> backend.predict({name: crops[name] for name in backend.input_names})["age"]  # doctest: +SKIP

Running a shipped ``.tflite`` or ``.onnx`` file imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from c3ae.errors import C3AEError, UsageError
from c3ae.litert import abandon, default_threads, quiet_first_delegate, rebuild_after_fork
from c3ae.models.spec import ModelInfo

if TYPE_CHECKING:  # pragma: no cover
    import keras

BACKENDS = ("keras", "tflite", "onnx")
METADATA_KEY = "c3ae"  # key of the preprocessing description in TFLite / ONNX metadata

_SUFFIX_BACKEND = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".hdf5": "keras"}


class BackendError(C3AEError, ValueError):
    """A model or backend that cannot be loaded as asked (unknown backend, missing or unreadable file)."""


class Backend:
    """A loaded model that maps named float32 BGR [0, 255] crops to named float32 outputs."""

    name: str = ""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    input_size: int = 0
    metadata: dict = {}
    origin: str = ""  # the file or name it was loaded from

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``{input_name: (N, S, S, 3) float32 BGR [0, 255]}``; returns ``{output_name: array}``."""
        raise NotImplementedError

    @property
    def info(self) -> ModelInfo:
        """What the model is (family, build options, crop layout), as its file says (``model_info`` in its
        ``c3ae`` metadata, which ``c3ae export`` writes)."""
        described = (self.metadata or {}).get("model_info")
        if not described:
            raise BackendError(
                f"{self.origin or self.name} does not say which c3ae model it is (no model_info in its c3ae "
                "metadata); export it again with 'c3ae export'."
            )
        return ModelInfo.from_dict(described)

    def _check(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UsageError(f"Missing model inputs {missing}; this model takes {list(self.input_names)}.")
        arrays = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self.input_names}
        shapes = {a.shape for a in arrays.values()}
        shape = next(iter(shapes))
        expected = (self.input_size, self.input_size, 3)
        if len(shapes) != 1 or len(shape) != 4 or shape[0] < 1 or shape[1:] != expected:
            raise UsageError(
                f"Inputs must share one shape (N, {self.input_size}, {self.input_size}, 3) with N >= 1 "
                f"(float32 BGR, raw pixels in [0, 255]); got {sorted(shapes)}."
            )
        return arrays

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name}: inputs {list(self.input_names)} {self.input_size}x"
            f"{self.input_size}, outputs {list(self.output_names)}>"
        )


# --------------------------------------------------------------------------------------------------- keras
class KerasBackend(Backend):
    """A ``keras.Model`` run with ``predict_on_batch`` (one compiled graph call per batch)."""

    name = "keras"

    def __init__(self, model: keras.Model):
        self.model = model
        self._takes_dict = isinstance(model.input, dict)
        self.input_names = tuple(_ordered_inputs([t.name for t in model.inputs]))
        self.output_names = tuple(sorted(model.output_names))
        self.input_size = int(model.inputs[0].shape[1])
        from c3ae.models.base import model_info

        self.metadata = {"model_info": model_info(model).to_dict()} if hasattr(model, "family") else {}
        trained = getattr(model, "preprocessing", None)
        if self.metadata and trained:  # the face pipeline it was trained with (c3ae.bundled.load_model)
            from c3ae.export.metadata import contract

            self.metadata["preprocessing"] = contract(trained)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._check(inputs)
        feed = arrays if self._takes_dict else arrays[self.input_names[0]]
        outputs = self.model.predict_on_batch(feed)
        if not isinstance(outputs, dict):
            outputs = dict(zip(self.model.output_names, _as_list(outputs), strict=True))
        return {name: np.asarray(outputs[name], dtype=np.float32) for name in self.output_names}


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


# -------------------------------------------------------------------------------------------------- tflite
class TFLiteBackend(Backend):
    """A TFLite flatbuffer run by LiteRT (``ai_edge_litert``) through its ``serving_default`` signature.

    Inputs are resized (and tensors reallocated) only when the batch size changes. Safe to share between
    threads (each call runs under the backend's lock) and across ``os.fork`` (the child builds its own
    interpreter on its first call; see ``c3ae.litert``).
    """

    name = "tflite"

    def __init__(self, flatbuffer: bytes, threads: int | None = None, xnnpack: bool | None = None):
        """``xnnpack``: run on LiteRT's default XNNPACK delegate (True), on the builtin kernels (False), or
        None: XNNPACK unless the graph is int8 with an empty-range tensor (:func:`degenerate_int8_tensors`),
        which XNNPACK refuses to prepare or, in LiteRT 2.3, aborts the process on (double free)."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.flatbuffer = bytes(flatbuffer)
        self.threads = int(threads) if threads is not None else default_threads()
        plain = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            probe = Interpreter(
                model_content=self.flatbuffer, num_threads=self.threads, experimental_op_resolver_type=plain
            )
            self.delegate = not degenerate_int8_tensors(probe) if xnnpack is None else bool(xnnpack)
            self._interpreter = probe if not self.delegate else self._build()
        except (ValueError, RuntimeError) as error:  # RuntimeError: a graph XNNPACK cannot prepare
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendError(f"Not a readable TFLite model: {reason}") from error
        signatures = self._interpreter.get_signature_list()
        if not signatures:
            raise BackendError("The TFLite model has no signature; export it with 'c3ae export'.")
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        runner = self._interpreter.get_signature_runner(key)
        self._inputs = runner.get_input_details()
        self._outputs = runner.get_output_details()
        self._key = key
        self._direct = getattr(runner, "_subgraph_index", 0) == 0
        del runner  # a live runner holds the interpreter and would forbid resize_tensor_input
        self.input_names = tuple(_ordered_inputs(self._inputs))
        self.output_names = tuple(sorted(self._outputs))
        self.input_size = _crop_side([list(d["shape_signature"]) for d in self._inputs.values()])
        self.metadata = tflite_metadata(flatbuffer)
        self._shape: tuple | None = None
        self.size_bytes = len(flatbuffer)
        self._lock = threading.Lock()
        rebuild_after_fork(self)

    def _build(self):
        """A fresh interpreter of the flatbuffer: on XNNPACK when ``delegate``, else on builtin kernels."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if not self.delegate:
            plain = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            return Interpreter(
                model_content=self.flatbuffer, num_threads=self.threads, experimental_op_resolver_type=plain
            )
        with quiet_first_delegate():
            interpreter = Interpreter(model_content=self.flatbuffer, num_threads=self.threads)
            interpreter.allocate_tensors()
        return interpreter

    @property
    def interpreter(self):
        """The LiteRT ``Interpreter`` (built again in a forked child). Not thread-safe on its own: hold
        the backend's lock, or call :meth:`predict`."""
        if self._interpreter is None:
            self._interpreter = self._build()
            self._shape = None
        return self._interpreter

    def _after_fork(self) -> None:
        """In a forked child: a new lock, and the parent's interpreter set aside for a fresh one."""
        self._lock = threading.Lock()
        abandon(self._interpreter)
        self._interpreter, self._shape = None, None

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {n: _quantize(a, self._inputs[n]) for n, a in self._check(inputs).items()}
        with self._lock:
            return self._invoke(arrays)

    def _invoke(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self.interpreter
        if not self._direct:
            results = interpreter.get_signature_runner(self._key)(**arrays)
            return {n: _dequantize(results[n], self._outputs[n]) for n in self.output_names}
        shape = next(iter(arrays.values())).shape
        if shape != self._shape:
            for name, array in arrays.items():
                interpreter.resize_tensor_input(self._inputs[name]["index"], array.shape, strict=False)
            with quiet_first_delegate(self.delegate):
                interpreter.allocate_tensors()
            self._shape = shape
        for name, array in arrays.items():
            interpreter.set_tensor(self._inputs[name]["index"], array)
        interpreter.invoke()
        return {  # get_tensor copies: the results outlive the next call
            n: _dequantize(interpreter.get_tensor(self._outputs[n]["index"]), self._outputs[n])
            for n in self.output_names
        }


# An int8 activation whose calibrated range was empty (a dead layer: the same value for every input) gets a
# scale near 1e-8; XNNPACK rejects requantisation ratios that large. Real activations stay far above this.
DEGENERATE_SCALE = 1e-6


def degenerate_int8_tensors(interpreter) -> list[str]:
    """Names of the int8 tensors of a LiteRT ``Interpreter`` quantised with a scale below 1e-6."""
    names = []
    for tensor in interpreter.get_tensor_details():
        scales = tensor["quantization_parameters"]["scales"]
        if tensor["dtype"] == np.int8 and len(scales) == 1 and 0 < scales[0] < DEGENERATE_SCALE:
            names.append(tensor["name"])
    return names


def _quantize(array: np.ndarray, details: dict) -> np.ndarray:
    dtype = np.dtype(details["dtype"])
    if dtype == np.float32:
        return array
    scale, zero = details["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(array / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(array: np.ndarray, details: dict) -> np.ndarray:
    if np.dtype(details["dtype"]) == np.float32:
        return array
    scale, zero = details["quantization"]
    return ((array.astype(np.float32) - zero) * scale).astype(np.float32)


MAX_CROP_SIDE = 512  # pixels: the largest model input side a file may ask for


def _crop_side(shapes: list[list]) -> int:
    """The side S of inputs shaped (N, S, S, 3) (N free), all alike; else BackendError: a graph that takes
    something other than square BGR crops is not a c3ae model."""
    sides = set()
    shapes = [[int(d) if isinstance(d, (int, np.integer)) else -1 for d in shape] for shape in shapes]
    for dims in shapes:
        if len(dims) != 4 or dims[3] != 3 or dims[1] != dims[2] or not 8 <= dims[1] <= MAX_CROP_SIDE:
            sides.add(None)
        else:
            sides.add(int(dims[1]))
    if len(sides) != 1 or None in sides:
        raise BackendError(
            f"it is not a c3ae model: its inputs {shapes} are not square BGR crops (N, S, S, 3) with S "
            f"from 8 to {MAX_CROP_SIDE}."
        )
    return sides.pop()


def _ordered_inputs(names) -> list[str]:
    """Input names in the conventional order: outer, middle, inner; then the rest sorted."""
    preferred = ("outer", "middle", "inner", "image")
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def tflite_metadata(flatbuffer: bytes) -> dict:
    """The preprocessing description ``c3ae export`` embeds in a TFLite file (metadata ``"c3ae"``), or {}."""
    from c3ae.export.metadata import read_tflite_metadata

    return read_tflite_metadata(flatbuffer)


# ---------------------------------------------------------------------------------------------------- onnx
class OnnxBackend(Backend):
    """An ONNX model run by ONNX Runtime on the CPU. Safe to share between threads (each call runs under
    the backend's lock) and across ``os.fork`` (the child builds its own session on its first call)."""

    name = "onnx"

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        from c3ae.extras import import_optional

        self._ort = import_optional("onnxruntime")
        self._model_bytes = bytes(model_bytes)
        self.threads = threads
        self._lock = threading.Lock()
        try:
            self._session = self._build()
        except Exception as error:  # onnxruntime raises its own (non-ValueError) exception types
            raise BackendError(f"Not a readable ONNX model: {error}") from error
        self.input_names = tuple(_ordered_inputs([i.name for i in self._session.get_inputs()]))
        self.output_names = tuple(sorted(o.name for o in self._session.get_outputs()))
        self.input_size = _crop_side([list(i.shape) for i in self._session.get_inputs()])
        props = self._session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
        except json.JSONDecodeError:
            self.metadata = {}
        self.size_bytes = len(model_bytes)
        rebuild_after_fork(self)

    def _build(self):
        options = self._ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return self._ort.InferenceSession(
            self._model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )

    @property
    def session(self):
        """The ONNX Runtime ``InferenceSession`` (built again in a forked child). Hold the backend's lock
        while running it, or call :meth:`predict`."""
        if self._session is None:
            self._session = self._build()
        return self._session

    def _after_fork(self) -> None:
        """In a forked child: a new lock, and the parent's session set aside for a fresh one."""
        self._lock = threading.Lock()
        abandon(self._session)
        self._session = None

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._check(inputs)
        with self._lock:  # one run at a time: a fork then never lands inside ONNX Runtime
            values = self.session.run(list(self.output_names), arrays)
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, values, strict=True)}


# ---------------------------------------------------------------------------------------------------- load
_CONVERTED: dict[tuple, bytes] = {}


def _keras_model(model) -> keras.Model:
    from c3ae.extras import import_optional

    keras = import_optional("keras")

    if isinstance(model, keras.Model):
        return model
    from c3ae.bundled import ModelNotFoundError, load_model

    try:
        return load_model(model)
    except ModelNotFoundError as error:
        raise BackendError(str(error)) from error


def _weights_dir() -> Path:
    """The one weights folder, ``c3ae.bundled.WEIGHTS_DIR`` (read at call time, so tests can move it)."""
    from c3ae import bundled

    return bundled.WEIGHTS_DIR


def _converted(model, backend: str) -> bytes:
    """The fp32 TFLite / ONNX bytes of a Keras model, a bundled name or a .keras path (cached per file)."""
    key = None
    if not _is_keras_model(model):
        path = Path(model) if Path(model).is_file() else _weights_dir() / f"{model}.keras"
        if path.is_file():
            stat = path.stat()
            key = (backend, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
            if key in _CONVERTED:
                return _CONVERTED[key]
    keras_model = _keras_model(model)
    if backend == "tflite":
        from c3ae.export.tflite import to_tflite

        data = to_tflite(keras_model, "none")
    else:
        from c3ae.export.onnx import to_onnx

        data = to_onnx(keras_model)
    if key is not None:
        _CONVERTED[key] = data
    return data


def _is_keras_model(model) -> bool:
    if isinstance(model, (str, Path)):
        return False
    import keras

    return isinstance(model, keras.Model)


def load_backend(
    model: str | Path | keras.Model, backend: str = "auto", *, threads: int | None = None
) -> Backend:
    """Load ``model`` for inference with ``backend``.

    Args:
        model: a ``keras.Model``, a bundled model's name (``"c3ae-utk"``), or a ``.keras``, ``.tflite`` or
            ``.onnx`` file.
        backend: ``"keras"``, ``"tflite"``, ``"onnx"``, or ``"auto"`` (the file's own format; for a bundled
            name its shipped ``.tflite`` if there is one; otherwise Keras). A Keras model or a bundled
            name asked for as TFLite or ONNX uses the shipped ``c3ae/weights/<name>.tflite`` /
            ``.onnx`` when there is one, else is converted in memory (fp32) once per file.
        threads: CPU threads (LiteRT ``num_threads``, ONNX Runtime ``intra_op_num_threads``); None = one
            per core up to 4 for LiteRT (``c3ae.litert.default_threads``), ONNX Runtime's own default for
            ONNX. Keras ignores it once TensorFlow has started.

    Raises:
        BackendError: unknown backend, a file that does not exist, or one of the wrong kind.
    """
    if backend not in (*BACKENDS, "auto"):
        raise BackendError(f"Unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}.")
    if threads is not None and int(threads) < 1:
        raise BackendError(f"threads must be >= 1, got {threads}.")
    if not _is_keras_model(model):
        if not isinstance(model, (str, Path)):
            raise BackendError(f"Expected a keras.Model, a bundled model's name or a file; got {model!r}.")
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix in _SUFFIX_BACKEND and not path.is_file():
            raise BackendError(f"Model file {path} does not exist.")
        if path.is_file():
            kind = _SUFFIX_BACKEND.get(suffix, "keras")
            if kind in ("tflite", "onnx"):
                if backend not in (kind, "auto"):
                    raise BackendError(
                        f"{path} is a {kind.upper() if kind == 'onnx' else 'TFLite'} file; it runs with "
                        f"backend '{kind}' only, not {backend!r}."
                    )
                return _from_bytes(kind, path.read_bytes(), threads, str(path))
        elif backend in ("tflite", "onnx", "auto"):
            # "auto" on a bundled name: the shipped, verified TFLite artifact when there is one.
            shipped = _weights_dir() / f"{model}.{'tflite' if backend == 'auto' else backend}"
            if shipped.is_file():
                kind = "tflite" if backend == "auto" else backend
                return _from_bytes(kind, shipped.read_bytes(), threads, str(shipped))
    if backend in ("auto", "keras"):
        _keras_threads(threads)
        return KerasBackend(_keras_model(model))
    return _from_bytes(backend, _converted(model, backend), threads, str(model))


def _from_bytes(kind: str, data: bytes, threads: int | None, origin: str) -> Backend:
    """A TFLite / ONNX backend of ``data``, refused in one sentence unless it is a c3ae model: a c3ae
    description (family, a face pipeline within range) whose inputs are the graph's."""
    from c3ae.export.metadata import ForeignModelError, check_description

    if kind == "tflite" and data[4:8] == b"TFL3":  # checked before LiteRT prepares a graph of anyone's
        try:
            check_description(tflite_metadata(data), origin)
        except ForeignModelError as error:
            raise BackendError(str(error)) from None
    try:
        backend = TFLiteBackend(data, threads) if kind == "tflite" else OnnxBackend(data, threads)
    except BackendError as error:
        raise BackendError(f"{origin}: {error}") from error
    backend.origin = origin
    try:
        check_description(backend.metadata, origin)
    except ForeignModelError as error:
        raise BackendError(str(error)) from None
    described = set(backend.info.inputs)
    if described != set(backend.input_names) or backend.info.input_size != backend.input_size:
        raise BackendError(
            f"{origin} is not the model its description says: the graph takes {list(backend.input_names)} "
            f"{backend.input_size}x{backend.input_size}, the description {sorted(described)} "
            f"{backend.info.input_size}x{backend.info.input_size}; export it again with 'c3ae export'."
        )
    return backend


def _keras_threads(threads: int | None) -> None:
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised: the setting cannot change any more
        pass
