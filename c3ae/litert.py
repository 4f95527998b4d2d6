"""LiteRT interpreters for the detector and the age/gender runtime: quiet, thread-safe and fork-safe.

LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ the first time a process
allocates an interpreter on XNNPACK; there is no API to silence it, so that first allocation runs with the
process's stderr (file descriptor 2) pointed at /dev/null (one thread at a time: the descriptor is the
process's). Errors still surface as Python exceptions.

An interpreter is one mutable state (input tensors, arena, thread pool): its owners (``TFLiteBackend``,
the detector's networks) run each call under their own lock. After ``os.fork`` the child has the parent's
interpreters without their thread pools: using them hangs, and freeing them crashes. Owners register with
:func:`rebuild_after_fork`: a fork waits until no thread is inside one of them (it takes every owner's
``_lock``), and in the child their ``_after_fork`` makes a new lock and hands the inherited interpreters
to :func:`abandon` (kept, never freed), so that the next call builds fresh ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import weakref
from collections.abc import Iterator

_delegate_announced = False
_stderr_lock = threading.RLock()  # fd 2 is the process's: one redirection at a time
_fork_aware: weakref.WeakSet = weakref.WeakSet()
_abandoned: list = []  # the parent's interpreters in a forked child: freeing them would crash


def default_threads() -> int:
    """LiteRT threads per interpreter when none are asked for: one per CPU core, at most 4. LiteRT's own
    default is one thread, which left the second core idle while a face and its mirror ran (2.3 against
    1.3 ms on 2 cores); the answers are the same to the bit at any thread count."""
    return min(4, os.cpu_count() or 1)


def stderr_lock() -> threading.RLock:
    """The process's one lock for pointing file descriptor 2 elsewhere for a while (here and in
    ``c3ae.faces``' JPEG check): two redirections at once would leave stderr on the wrong file. A fork
    waits for it; the child gets a new one."""
    return _stderr_lock


def rebuild_after_fork(owner) -> None:
    """Make ``owner`` fork-safe while it lives: ``os.fork`` waits for its ``_lock`` (a ``threading.Lock``
    held around each of its calls), and the child calls ``owner._after_fork()``, which replaces the lock."""
    _fork_aware.add(owner)


def abandon(*objects) -> None:
    """Keep ``objects`` (a parent's interpreters, in a forked child) alive for good: their destructors
    join thread pools that did not survive the fork, which crashes the child, at exit at the latest."""
    for item in objects:
        if item is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(item))  # survives interpreter shutdown too
            _abandoned.append(item)


_held: list = []  # the locks the forking thread took before the fork


def _before_fork() -> None:
    # Owners' locks first, then stderr's: a caller may take stderr's while holding its owner's, not the
    # reverse. No fork in the middle of a call, nor of a redirection (the child would keep /dev/null).
    for owner in list(_fork_aware):
        lock = getattr(owner, "_lock", None)
        if lock is not None and lock.acquire():
            _held.append(lock)
    _stderr_lock.acquire()


def _after_fork_in_parent() -> None:
    _stderr_lock.release()
    while _held:
        _held.pop().release()


def _after_fork_in_child() -> None:
    global _stderr_lock
    _stderr_lock = threading.RLock()
    _held.clear()
    for owner in list(_fork_aware):
        owner._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )


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
    with _stderr_lock:
        if _delegate_announced:  # another thread allocated it meanwhile
            yield
            return
        with _native_stderr_silenced():
            yield
        _delegate_announced = True
