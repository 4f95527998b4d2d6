"""LiteRT interpreters for the detector and the age/gender runtime, without LiteRT's start-up chatter.

LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ the first time a process
allocates an interpreter on XNNPACK; there is no API to silence it, so that first allocation runs with the
process's stderr (file descriptor 2) pointed at /dev/null. Errors still surface as Python exceptions.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_delegate_announced = False


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters, some test runners)
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet_first_delegate(xnnpack: bool = True) -> Iterator[None]:
    """Run a block that may allocate the process's first XNNPACK interpreter with that line silenced."""
    global _delegate_announced
    if _delegate_announced or not xnnpack:
        yield
        return
    with _native_stderr_silenced():
        yield
    _delegate_announced = True
