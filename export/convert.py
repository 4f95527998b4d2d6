"""Converters run in a child process with a timeout, so no model or data can hang or kill an export.

The TFLite converter (its int8 calibrator above all), tf2onnx and coremltools are native code that can
abort the whole process ("terminate called without an active exception", exit 134) or never return.
:func:`convert` runs one conversion in a fresh Python (``python -c``, neither a fork, which TensorFlow does
not survive, nor multiprocessing, which re-runs a caller's script that lacks an ``if __name__ ==
"__main__"`` guard), waits at most ``timeout`` seconds, and turns a crash or a timeout into a
:class:`~c3ae.export.checks.ConverterError`: one sentence naming the format. The child only converts and
writes the artifact; the parent verifies it. Its output (TensorFlow's and the converters' logs) goes to a
log file whose last line the error quotes, not to the user's terminal; there, a spinner with the
elapsed seconds (:func:`c3ae.progress.stage`) shows that the child still works.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from c3ae.export.checks import ConverterError, ExportError
from c3ae.progress import stage

log = logging.getLogger(__name__)

CONVERT_TIMEOUT = 600.0  # seconds; the C3AE models convert in under a minute, int8 calibration included
CONVERTER = "c3ae.export.convert:convert_job"  # module:function the child calls with the job

# The child's TensorFlow logs little (unless the caller says otherwise) and sees no GPU: converting needs
# none, and a second process initialising one would claim memory the parent's TensorFlow may hold.
_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}
_NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}

# Runs in the child: the parent's import path first (a source checkout, a test folder), then the job.
_BOOTSTRAP = (
    "import json, sys\n"
    "job = json.load(open(sys.argv[1]))\n"
    "sys.path[:0] = [p for p in job['sys_path'] if p not in sys.path]\n"
    "from c3ae.export.convert import child_main\n"
    "child_main(sys.argv[1])\n"
)


def convert(
    model,
    format: str,
    quant: str,
    output: str | Path,
    calibration: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    *,
    source: str | Path | None = None,
    timeout: float | None = None,
    converter: str | None = None,
) -> dict:
    """Convert ``model`` to ``format`` at ``output`` in a child process; returns the facts the converter
    reports (weight bytes, float ops, opset).

    Args:
        model: the ``keras.Model``; it is saved for the child unless ``source`` (a ``.keras`` file or a
            bundled model's name that loads to it) is given.
        calibration: for int8, ``{input_name: (N, S, S, 3) float32}`` crops to calibrate on.
        timeout: seconds before the child is killed (default :data:`CONVERT_TIMEOUT`).
        converter: ``"module:function"`` the child calls with the job (default :data:`CONVERTER`).

    Raises:
        ConverterError: the converter raised (the message names its exception), its process died (a
            signal, an abort) or it did not finish within ``timeout``.
    """
    timeout = float(CONVERT_TIMEOUT if timeout is None else timeout)
    what = f"{format}" + (f" ({quant})" if quant != "none" else "")
    with tempfile.TemporaryDirectory(prefix="c3ae-convert-") as work:
        work = Path(work)
        if source is None:
            source = work / "model.keras"
            model.save(source)
        elif Path(source).is_file():
            source = Path(source).resolve()
        calibration_file = None
        if calibration is not None:
            calibration_file = work / "calibration.npz"
            np.savez(calibration_file, **calibration)
        job = {
            "converter": converter or CONVERTER,
            "model": str(source),
            "format": format,
            "quant": quant,
            "opset": int(opset),
            "output": str(Path(output).resolve()),
            "calibration": None if calibration_file is None else str(calibration_file),
            "result": str(work / "result.json"),
            "sys_path": [str(Path(p).resolve()) if p else "" for p in sys.path],
        }
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job))
        log_file = work / "converter.log"
        doing = f"converting to {what} in a child process (at most {timeout:g} s)"
        with open(log_file, "wb") as handle, stage(doing, then="checking the artifact against Keras"):
            try:
                done = subprocess.run(
                    [sys.executable, "-c", _BOOTSTRAP, str(job_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    env=_QUIET | dict(os.environ) | _NO_GPU,
                )
            except subprocess.TimeoutExpired:
                _log_tail(log_file)
                raise ConverterError(
                    f"Converting to {what} did not finish within {timeout:g} s, so the converter was "
                    "stopped; try again, and report it with the command you ran if it hangs again."
                ) from None
        result = _read_result(Path(job["result"]))
        if result is not None and result["ok"]:
            return result["facts"]
        _log_tail(log_file)
        if result is not None:
            log.debug("converter traceback:\n%s", result["traceback"])
            raise ConverterError(f"Converting to {what} failed: {result['type']}: {result['message']}")
        last = _last_line(log_file)
        if done.returncode < 0:
            how = f"was killed by {signal.Signals(-done.returncode).name}"
        else:
            how = f"exited with code {done.returncode}"
        raise ConverterError(
            f"Converting to {what} failed: the converter process {how}"
            + (f" ({last})" if last else "")
            + "; no artifact was written (report it with the command you ran)."
        )


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _log_tail(path: Path) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("converter output:\n%s", path.read_text(errors="replace")[-8000:])


# ------------------------------------------------------------------------------------------- the child
def child_main(job_file: str) -> None:
    """The child's entry point: run the job's converter and write its facts (or its exception) as JSON."""
    from c3ae.files import atomic_write_text

    job = json.loads(Path(job_file).read_text())
    try:
        module, name = job["converter"].split(":")
        facts = getattr(importlib.import_module(module), name)(job)
        result = {"ok": True, "facts": facts}
    except BaseException as error:  # reported by the parent, which owns the user's terminal
        result = {
            "ok": False,
            "type": type(error).__name__,
            "message": str(error),
            "traceback": traceback.format_exc(),
        }
    atomic_write_text(job["result"], json.dumps(result, default=str))


def convert_job(job: dict) -> dict:
    """Load the job's model and write its artifact (:func:`write_artifact`)."""
    from c3ae.bundled import load_model

    calibration = None
    if job["calibration"]:
        with np.load(job["calibration"]) as data:
            calibration = {name: data[name] for name in data.files}
    model = load_model(job["model"])
    return write_artifact(model, job["format"], job["quant"], Path(job["output"]), calibration, job["opset"])


def write_artifact(
    model, format: str, quant: str, path: Path, calibration: dict | None = None, opset: int = 17
) -> dict:
    """Convert ``model`` and write it to ``path`` in this process; returns format-specific facts for the
    export report. ``calibration`` holds int8's crops, ``{input_name: (N, S, S, 3) float32}``."""
    facts: dict = {}
    if format == "tflite":
        from c3ae.export.tflite import float_ops, to_tflite, weight_bytes

        representative = [calibration] if quant == "int8" else None
        data = to_tflite(model, quant, representative)
        path.write_bytes(data)
        facts["weight_bytes"] = weight_bytes(data)
        if quant == "int8":
            facts["float_ops"] = float_ops(data)
    elif format == "onnx":
        from c3ae.export.onnx import to_onnx

        path.write_bytes(to_onnx(model, opset=opset))
        facts["opset"] = int(opset)
    elif format == "saved_model":
        from c3ae.export.saved_model import to_saved_model

        to_saved_model(model, path)
    elif format == "coreml":
        from c3ae.export.coreml import to_coreml

        to_coreml(model, quant).save(str(path))
    else:
        raise ExportError(f"Unknown format {format!r}.")
    return facts
