"""A spinner with elapsed time for long steps that report no progress of their own (a converter's child
process, an int8 calibration), on a terminal only.

``with spinner("exporting m.keras to tflite"):`` draws ``exporting m.keras to tflite | 12 s`` on stderr,
redrawn a few times a second, and leaves ``... done in 170.2 s`` when the block ends. Code deeper down
names its own stage without knowing whether anyone shows it: ``with stage("converting in a child
process", then="verifying against Keras"):`` relabels the running spinner (its clock restarts) and, on
leaving, hands it the label of what comes next. Nothing is drawn when stderr is not a terminal (a log,
a pipe, a test), so outputs stay exactly as they were.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

FRAMES = "|/-\\"


class Spinner:
    """One line on ``stream``: the label, a turning bar and the seconds since the label was set."""

    def __init__(self, title: str, stream: TextIO | None = None, interval: float = 0.25, first: str = ""):
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.title = title  # what the last line says was done
        self.started = time.monotonic()
        self._label = first or title
        self._since = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    @property
    def label(self) -> str:
        return self._label

    def relabel(self, label: str) -> None:
        """Show ``label`` from now on, its clock starting at zero."""
        with self._lock:
            self._label, self._since = label, time.monotonic()
        self._draw()

    def _write(self, text: str) -> None:
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        try:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken terminal: stop drawing
            self._stop.set()

    def _draw(self, frame: int = 0) -> None:
        with self._lock:
            seconds = time.monotonic() - self._since
            self._write(f"{self._label} {FRAMES[frame % len(FRAMES)]} {seconds:.0f} s")

    def _run(self) -> None:
        frame = 0
        while not self._stop.wait(self.interval):
            frame += 1
            self._draw(frame)

    def start(self) -> Spinner:
        self._draw()
        self._thread = threading.Thread(target=self._run, name="c3ae-spinner", daemon=True)
        self._thread.start()
        return self

    def stop(self, ok: bool = True) -> None:
        """Stop drawing; leave ``<title>: done in N s`` (``ok``) or clear the line (an error follows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if ok:
                self._write(f"{self.title}: done in {time.monotonic() - self.started:.1f} s")
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\n")
                    self.stream.flush()
            else:
                self._write("")
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\r")
                    self.stream.flush()


_active: list[Spinner] = []


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def spinner(title: str, first: str = "", stream: TextIO | None = None) -> Iterator[Spinner | None]:
    """Show ``first`` (default ``title``) with a spinner and the elapsed seconds while the block runs, and
    ``<title>: done in N s`` after it, when ``stream`` (stderr) is a terminal; yields the :class:`Spinner`
    or None. Nested inside another, it relabels that one (see :func:`stage`)."""
    stream = sys.stderr if stream is None else stream
    if _active:
        with stage(first or title):
            yield _active[-1]
        return
    if not _is_terminal(stream):
        yield None
        return
    shown = Spinner(title, stream, first=first).start()
    _active.append(shown)
    ok = False
    try:
        yield shown
        ok = True
    finally:
        _active.remove(shown)
        shown.stop(ok)


@contextlib.contextmanager
def stage(label: str, then: str | None = None) -> Iterator[None]:
    """Name the step the block runs on the spinner that is showing, if any (its clock restarts); on
    leaving, the spinner shows ``then`` (what comes next), else its earlier label again."""
    if not _active:
        yield
        return
    shown = _active[-1]
    earlier = shown.label
    shown.relabel(label)
    try:
        yield
    finally:
        if shown in _active:
            shown.relabel(then or earlier)
