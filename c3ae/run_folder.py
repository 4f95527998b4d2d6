"""A training run folder: one run at a time (:class:`RunLock`), and whether its run already finished
(:func:`finished_summary`). Imports neither TensorFlow nor Keras, so that ``c3ae train`` can answer a
finished or busy folder at once.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from c3ae.errors import C3AEError

LOCK_FILE = ".c3ae-train.lock"  # in the run folder: "<pid> <host>" of the training that holds it


class RunFolderBusyError(C3AEError, RuntimeError):
    """Another training holds the run folder."""


# folder -> [open file descriptor, depth, whether the lock created the folder]: re-entrant in one process
_held: dict[Path, list] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _holder(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, "") when unreadable."""
    try:
        pid, _, host = path.read_text(encoding="utf-8", errors="replace").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


class RunLock:
    """Hold ``folder`` (created) for one training: ``with RunLock(folder): ...``.

    The lock is an ``flock`` on ``folder/.c3ae-train.lock`` where the system has one, so the kernel
    releases it when its process dies however it dies; elsewhere the file itself is the lock, and one
    naming a process of this host that no longer runs is taken over. Re-entrant within one process (a
    recipe's stages lock the folder that holds theirs). A folder held by another process raises
    :class:`RunFolderBusyError` naming its pid."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE

    def __enter__(self) -> RunLock:
        key = self.folder.resolve()
        if key in _held:
            _held[key][1] += 1
            return self
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            _held[key] = [self._acquire(), 1, created]
        except BaseException:
            self._remove_if_empty(created)
            raise
        return self

    def _remove_if_empty(self, created: bool) -> None:
        """Remove the folder this lock created when nothing was written to it (a run that failed at once)."""
        if created:
            try:
                self.folder.rmdir()
            except OSError:  # not empty: a run's files
                pass

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        try:
            self.path.unlink(missing_ok=True)  # while still held: no other process can have taken it
        except OSError:
            pass
        if fd is not None:
            os.close(fd)
        self._remove_if_empty(entry[2])

    def _busy(self) -> RunFolderBusyError:
        pid, host = _holder(self.path)
        who = f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        return RunFolderBusyError(
            f"{self.folder} is in use by another c3ae train ({who if pid else 'another process'}); "
            "wait for it to finish, or give another --out."
        )

    def _stamp(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def _acquire(self) -> int | None:
        try:
            import fcntl
        except ImportError:  # Windows: the file is the lock
            return self._acquire_by_file()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        except OSError:  # a file system without locks (some network mounts): fall back to the pid
            os.close(fd)
            return self._acquire_by_file()
        if os.fstat(fd).st_nlink == 0:  # removed by its releasing holder between our open and lock
            os.close(fd)
            return self._acquire()
        self._stamp(fd)
        return fd

    def _acquire_by_file(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, host = _holder(self.path)
                stale = pid is not None and host == socket.gethostname() and not _alive(pid)
                if not stale:
                    raise self._busy() from None
                self.path.unlink(missing_ok=True)  # its training died: take the folder over
                continue
            self._stamp(fd)
            os.close(fd)
            return None
        raise self._busy()


def finished_summary(config: dict, folder: str | Path) -> dict | None:
    """The ``summary.json`` of a run in ``folder`` that finished with this very config (``config`` as
    ``Config.to_dict()``, compared with the folder's ``config.yaml``); None when the run is not there, not
    finished, or was made with other settings (more epochs, say: training then resumes)."""
    from c3ae.config import ConfigError, safe_load_yaml

    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        earlier = safe_load_yaml((folder / "config.yaml").read_text(encoding="utf-8"), "config.yaml")
    except (OSError, ValueError, ConfigError):
        return None
    if not isinstance(summary, dict) or "best" not in summary or earlier != config:
        return None
    return summary
