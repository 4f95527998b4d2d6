"""Writing files without ever leaving a half-written one: a temporary name in the same folder, then rename.

Outputs that are not regular files (a character device such as ``/dev/null``, a FIFO, ``/dev/stdout`` and
anything else under ``/dev`` or ``/proc``) are written in place: a rename would replace the device or the
pipe with a regular file (for the whole machine, as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from c3ae.errors import C3AEError

TEMPORARY_MARK = ".partial-"


def temporary_path(target: str | Path) -> Path:
    """The hidden sibling of ``target`` it is written to before the rename: ``.<stem>.partial-<pid><suffix>``
    (the suffix is kept for writers that insist on one, such as Keras, OpenCV's muxers and Arrow)."""
    target = Path(target)
    return target.with_name(f".{target.stem}{TEMPORARY_MARK}{os.getpid()}{target.suffix}")


_SPECIAL_ROOTS = ("/dev/", "/proc/")


def written_in_place(target: str | Path) -> bool:
    """Whether ``target`` is written in place rather than through a temporary and a rename: a path that
    is, or whose symbolic links pass, under ``/dev`` or ``/proc`` (``/dev/stdout`` leads to a pipe, a
    terminal or the file the shell redirected to, none of which a rename may replace), or an existing path
    that is not a regular file or a folder once links are followed (a device, a FIFO, a socket)."""
    path = os.path.abspath(os.fspath(Path(target).expanduser()))
    for _ in range(40):  # the kernel's own limit on a chain of links
        if path.startswith(_SPECIAL_ROOTS):
            return True
        if not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing (or unreadable: the writer will say so)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def remove_path(path: str | Path) -> None:
    """Delete a file, a symlink or a folder tree; nothing when ``path`` does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class AtomicOutput:
    """A temporary path beside ``target`` for writers that outlive one ``with`` block (a video encoder, a
    JSON-lines stream): write to :attr:`path`, then :meth:`commit` (rename onto the target) or
    :meth:`discard` (delete). A folder (a SavedModel) replaces a folder of the same name. A target that is
    not a regular file (:func:`written_in_place`) is its own :attr:`path`: commit and discard leave it be."""

    def __init__(self, target: str | Path, fsync: bool = False):
        self.target = Path(target)
        self.fsync = fsync
        self.in_place = written_in_place(self.target)
        if self.in_place:
            self.path = self.target
            return
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = temporary_path(self.target)
        remove_path(self.path)  # left by a killed run of this process id

    def commit(self) -> Path:
        """Rename the written temporary onto the target (``fsync`` first when asked); returns the target.
        A temporary the writer already moved elsewhere (a failed export kept under another name) is not
        an error: nothing is published."""
        if self.in_place:
            return self.target
        if not (self.path.exists() or self.path.is_symlink()):
            return self.target
        if self.fsync and self.path.is_file():
            with open(self.path, "rb") as handle:
                os.fsync(handle.fileno())
        if self.path.is_dir() and self.target.is_dir() and not self.target.is_symlink():
            shutil.rmtree(self.target)  # os.replace cannot replace a non-empty folder
        os.replace(self.path, self.target)
        return self.target

    def discard(self) -> None:
        """Delete the temporary (a file or a folder); the target is left as it was."""
        if not self.in_place:
            remove_path(self.path)

    def named(self, error: BaseException) -> None:
        """Make ``error``, an ``OSError`` met while writing (a full disk), name the target rather than the
        temporary or nothing."""
        if isinstance(error, OSError) and str(error.filename) in ("None", str(self.path)):
            error.filename = str(self.target)


@contextlib.contextmanager
def atomic_path(target: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` with the same suffix (:func:`temporary_path`); rename it onto
    ``target`` when the block succeeds (``fsync`` first: a shard must survive a power cut), delete it when
    the block raises (Ctrl-C included); an ``OSError`` then names ``target``. See :class:`AtomicOutput`."""
    output = AtomicOutput(target, fsync)
    try:
        yield output.path
        output.commit()
    except BaseException as error:
        output.discard()
        output.named(error)
        raise


def atomic_write_bytes(target: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` (any bytes-like object) to ``target`` atomically; returns ``target`` as a Path."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically; returns ``target`` as a Path."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def probe_writable(target: str | Path, size: int = 1 << 16) -> None:
    """Write ``size`` bytes beside ``target`` and delete them: raises the ``OSError`` (naming ``target``) of a
    full or read-only disk or a folder we may not write, for writers that only say "cannot open" (OpenCV).
    Nothing for a target written in place (a device or a pipe has no folder of ours to probe)."""
    if written_in_place(target):
        return
    probe = temporary_path(target)
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(size))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        error.filename = str(target)
        raise
    finally:
        probe.unlink(missing_ok=True)


def stdout_gone() -> None:
    """The reader of stdout went away (``| head``): send what is still to come to /dev/null, so that
    neither later prints nor Python's flush at exit fail ("Exception ignored ... BrokenPipeError")."""
    import sys

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test's capture: nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries (:func:`temporary_path`) that killed processes left in ``folder``, not those
    of a live one (this one included); returns them."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
        pid = path.name.split(TEMPORARY_MARK, 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove_path(path)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------- the rule for outputs
class OutputError(C3AEError, ValueError):
    """An output path that would overwrite an input, sit inside an input folder, or replace a file of
    another kind; the message names the option, the path and the fix."""


_MAGIC = (
    (b"\xff\xd8\xff", "image"),
    (b"\x89PNG", "image"),
    (b"GIF8", "image"),
    (b"BM", "image"),
    (b"II*\x00", "image"),
    (b"MM\x00*", "image"),
    (b"PK\x03\x04", "archive"),  # .keras, .zip, .mlpackage parts
    (b"\x1aE\xdf\xa3", "video"),  # Matroska / WebM
)


def file_kind(path: str | Path) -> str:
    """What an existing file holds, from its first bytes: ``"empty"``, ``"image"``, ``"video"``,
    ``"tflite"``, ``"archive"``, ``"json"``, ``"text"`` or ``"binary"``; ``"folder"`` for a directory;
    ``"special"`` for a device, a FIFO or a socket (never read: a FIFO would block)."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if written_in_place(path):
        return "special"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "empty"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[4:8] == b"ftyp" or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WEBP")):
        return "image" if head[8:12] == b"WEBP" else "video"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if "\x00" in text:
        return "binary"
    return "json" if text.lstrip()[:1] in ("[", "{") else "text"


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(
    path: str | Path,
    option: str,
    inputs: Iterable[str | Path] = (),
    replaceable: Iterable[str] = ("empty",),
    folder: bool = False,
) -> Path:
    """Refuse (``OutputError``) an output that is an input (symlinks and hard links followed), lies inside
    an input folder, holds an input folder (``folder=True`` outputs: files mirrored into it could land on
    the inputs), or would replace an existing file whose :func:`file_kind` is not in ``replaceable`` (the
    kinds this output writes). Returns the path. ``option`` names the output in the message: a flag
    (``"--json"``) or a library parameter (``"output"``, carried as the error's ``parameter``)."""
    try:
        return _check_output(path, option, inputs, replaceable, folder)
    except OutputError as error:
        error.parameter = None if option.startswith("-") else option
        raise


def _check_output(path, option: str, inputs, replaceable, folder: bool) -> Path:
    target = _resolved(path)
    for given in inputs:
        source = _resolved(given)
        same = target == source or (target.exists() and source.exists() and os.path.samefile(target, source))
        if same and source.is_dir():
            raise OutputError(f"{option} {path} is the input folder {given}; write outside it.")
        if same:
            raise OutputError(
                f"{option} {path} is the input {given}; choose another name (inputs are never overwritten)."
            )
        if source.is_dir() and target.is_relative_to(source):
            raise OutputError(f"{option} {path} is inside the input folder {given}; write it outside.")
        if folder and source.is_dir() and source.is_relative_to(target):
            raise OutputError(f"{option} {path} holds the input {given}; choose a folder outside the inputs.")
    if not folder and target.exists():
        kind = file_kind(target)
        if kind not in {*replaceable, "empty", "special"}:  # a device or a pipe is written in place
            article = "an" if kind[0] in "aeiou" else "a"
            holds = "a folder" if kind == "folder" else f"{article} {kind} file"
            raise OutputError(
                f"{option} {path} already exists and holds {holds}, not what this command writes; "
                "remove it or choose another name."
            )
    return Path(path)


def distinct_outputs(outputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse (``OutputError``) two outputs of one command on one path (``(option, path)`` pairs; None and
    ``"-"`` are skipped): the second would replace the first. Character devices (``/dev/null``) may be
    named twice."""
    seen: dict[Path, str] = {}
    for option, path in outputs:
        if path is None or str(path) == "-":
            continue
        target = _resolved(path)
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.stat(target).st_mode):
                continue
        for other_path, other in seen.items():
            same = target == other_path or (
                target.exists() and other_path.exists() and os.path.samefile(target, other_path)
            )
            if same:
                raise OutputError(f"{other} and {option} both name {path}; give each output its own file.")
        seen[target] = option


# ----------------------------------------------------------------------- names a command owns in a folder
OUTPUTS_MARKER = ".c3ae-outputs"  # in an --output-dir folder: the names c3ae wrote there, one a line
_recorded: dict[Path, tuple[tuple[int, int], frozenset[str]]] = {}


def recorded_outputs(folder: str | Path) -> frozenset[str]:
    """The file names c3ae recorded writing in ``folder`` (:func:`record_output`); empty without a marker."""
    marker = Path(folder) / OUTPUTS_MARKER
    try:
        info = marker.stat()
    except OSError:
        return frozenset()
    key = (info.st_mtime_ns, info.st_size)
    cached = _recorded.get(marker)
    if cached is None or cached[0] != key:
        try:
            names = frozenset(line for line in marker.read_text(errors="replace").splitlines() if line)
        except OSError:
            names = frozenset()
        cached = _recorded[marker] = (key, names)
    return cached[1]


def record_output(target: str | Path) -> None:
    """Note in the marker of ``target``'s folder that c3ae writes ``target`` (before it is written, so a
    killed run's file is still known as ours); a later run may replace it, and nothing else."""
    target = Path(target)
    if target.name in recorded_outputs(target.parent):
        return
    marker = target.parent / OUTPUTS_MARKER
    try:
        with open(marker, "a", encoding="utf-8") as handle:
            handle.write(target.name + "\n")
    except OSError as error:  # a full disk: name the file being written, not the marker or nothing
        with contextlib.suppress(OSError):
            if marker.stat().st_size == 0:
                marker.unlink()  # no empty marker left behind
        if error.filename in (None, str(marker)):
            error.filename = str(target)
        raise


def replaceable_output(target: str | Path, kind: str = "image") -> bool:
    """Whether ``target`` may be written: it does not exist, or it is a regular file of ``kind`` that a c3ae
    run recorded writing there (:func:`record_output`). A user's file, a link, a device or a FIFO is not."""
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return True
    if target.is_symlink() or not target.is_file() or written_in_place(target):
        return False
    return target.name in recorded_outputs(target.parent) and file_kind(target) == kind


def json_holding(**values: object) -> Callable[[Path], bool]:
    """A test of an existing file: a JSON object (under 64 MB) holding ``values`` (key: value; a value of
    ``...`` only needs the key), as the JSON c3ae writes is recognised."""

    def test(path: Path) -> bool:
        import json

        try:
            if path.stat().st_size > 64 << 20:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and all(
            key in data and (value is ... or data[key] == value) for key, value in values.items()
        )

    return test


def text_starting(*prefixes: str) -> Callable[[Path], bool]:
    """A test of an existing file: UTF-8 text that starts with one of ``prefixes``."""

    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                head = handle.read(max(len(p.encode()) for p in prefixes))
        except OSError:
            return False
        return any(head.startswith(prefix.encode()) for prefix in prefixes)

    return test


def foreign_files(folder: str | Path, ours: Mapping[str, Callable[[Path], bool]]) -> list[str]:
    """The names of ``ours`` (paths relative to ``folder``, each with the test that recognises the file a
    c3ae run writes there) that exist in ``folder`` but are not ours: a user's file, a link, a device (an
    empty file is not foreign: it holds nothing to lose)."""
    folder = Path(folder)
    foreign = []
    for name, test in ours.items():
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or written_in_place(path):
            foreign.append(name)
        elif path.stat().st_size and not test(path):  # an empty file holds nothing to lose
            foreign.append(name)
    return foreign


def check_ours(folder: str | Path, option: str, ours: Mapping[str, Callable[[Path], bool]]) -> None:
    """Refuse (``OutputError``) to write into ``folder`` when any file it would replace is not one a c3ae
    run wrote (:func:`foreign_files`); the message names them. ``option`` as in :func:`check_output`."""
    foreign = foreign_files(folder, ours)
    if not foreign:
        return
    names = ", ".join(foreign)
    these = "it" if len(foreign) == 1 else "them"
    error = OutputError(
        f"{option} {folder} holds {names} that c3ae did not write; move {these} away or choose "
        "another folder (c3ae never replaces files it did not write)."
    )
    error.parameter = None if option.startswith("-") else option
    raise error
