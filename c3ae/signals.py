"""SIGTERM as Ctrl-C, and loops that stop between two steps rather than inside one.

``docker stop``, systemd, CI runners and ``kill`` send SIGTERM. The ``c3ae`` command (:func:`catch_sigterm`)
turns it into :class:`Terminated`, a ``KeyboardInterrupt``, so every command stops as after Ctrl-C: partial
results written, temporaries removed; the exit status is 143 instead of 130 (:func:`interrupted_code`).

An exception raised by a signal lands anywhere, also between a lock's acquire and the ``try`` that would
release it; a loop that must finalise with the same threads and queues (the video encoder) uses
:func:`stop_requests` instead: the signal only asks, and the loop stops between two frames.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_TERMINATED: list[bool] = []  # holds True once SIGTERM arrived while catch_sigterm's handler was in place
_HANDLERS: list = []  # [ours, the one it replaced] while catch_sigterm's handler is in place


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def catch_sigterm():
    """Make SIGTERM raise :class:`Terminated` in this process's main thread, once (a second SIGTERM while
    the command finalises its outputs is ignored; SIGKILL still stops it). A forked child gets the
    previous handler back (:func:`_in_child`). Returns the handler replaced, for :func:`release_sigterm`;
    None where handlers cannot be set (not the main thread)."""
    if not _main_thread():
        return None
    _TERMINATED.clear()
    owner = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked child that ran no fork hook: die as SIGTERM asks
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if _TERMINATED:
            return
        _TERMINATED.append(True)
        raise Terminated

    if not _HANDLERS:
        os.register_at_fork(after_in_child=_in_child)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    _HANDLERS[:] = [on_sigterm, previous]
    return previous


def release_sigterm(previous) -> None:
    """Put back the handler :func:`catch_sigterm` replaced."""
    if previous is not None and _main_thread():
        signal.signal(signal.SIGTERM, previous)


def _in_child() -> None:
    """A forked child (a worker pool's, gunicorn's) gets SIGTERM's previous meaning back: it is killed, as
    ``pool.terminate()`` expects, even when busy in C code, where a Python handler would wait."""
    if _HANDLERS and signal.getsignal(signal.SIGTERM) is _HANDLERS[0]:
        with contextlib.suppress(ValueError):  # not the main thread: the handler's pid check applies
            signal.signal(signal.SIGTERM, _HANDLERS[1] or signal.SIG_DFL)


def terminated() -> bool:
    """Whether SIGTERM stopped the command (since :func:`catch_sigterm`)."""
    return bool(_TERMINATED)


def interrupted_code() -> int:
    """The exit status of a command stopped early: 143 after SIGTERM, 130 after Ctrl-C (128 + signal)."""
    return 143 if _TERMINATED else 130


class StopRequests:
    """What :func:`stop_requests` hands the loop: ``bool(requests)`` is True once Ctrl-C or SIGTERM came."""

    def __init__(self):
        self.signals: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """While the block runs in the main thread, Ctrl-C and SIGTERM (where :func:`catch_sigterm` handles it)
    raise nothing: they are noted in the yielded :class:`StopRequests`, which the loop checks between two
    steps. SIGTERM still counts for :func:`interrupted_code`. Elsewhere (another thread) nothing changes."""
    requests = StopRequests()
    if not _main_thread():
        yield requests
        return

    def note(signum, frame):
        requests.signals.append(signum)
        if signum == signal.SIGTERM and not _TERMINATED:
            _TERMINATED.append(True)

    watched = [signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []
    if _HANDLERS and signal.getsignal(signal.SIGTERM) is _HANDLERS[0]:
        watched.append(signal.SIGTERM)
    previous = {signum: signal.signal(signum, note) for signum in watched}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
