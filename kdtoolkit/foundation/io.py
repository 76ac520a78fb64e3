"""Safe file writing: atomic writes, the clean-up of killed writers' temporary files, resource errors.

Every file kdtoolkit writes goes through :func:`atomic_write_bytes` (or
:func:`append_line`), both writing through one function (``_write_fd``).
A crash leaves either the old file or the new one, never a half-written one.

What used to live here too now has its own module, and is still importable
from here (``from kdtoolkit.foundation.io import read_safetensors`` keeps working):
the bounds on what is read (regular files only, the memory left:
``special_file_kind``, ``open_regular_file``, ``available_memory``) are in
:mod:`kdtoolkit.foundation.limits`; safetensors files (``read_safetensors``,
``read_safetensors_header``, ``atomic_save_safetensors``, ``CHECKSUM_KEY``,
``load_external_state_dict``, ``read_kdt_safetensors``, ...) in
:mod:`kdtoolkit.foundation.tensorfiles`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from kdtoolkit.foundation.errors import KdtError

TEMP_SUFFIX = ".tmp"

#: ``errno`` values of resource errors: a full disk, a quota, a read-only file system, a name
#: over the file system's limit, a file over the size limit. The command line reports them
#: (and ``MemoryError``) as one line with exit code 2 (:func:`resource_error_message`).
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG})

#: A temporary file of a dead writer is removed at once; one whose writer cannot be checked
#: (another machine, no PID in its name) once it is older than this (seconds).
STALE_TEMP_SECONDS = 24 * 3600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of new files, as ``open()`` would give them (``mkstemp`` alone gives 0600).
_FILE_MODE = 0o666 & ~_umask()

#: This machine, in temporary-file names: a writer's PID is checked only on the machine that wrote it.
_HOST = f"{zlib.crc32(os.uname().nodename.encode()) & 0xFFFFFF:06x}" if hasattr(os, "uname") else "000000"

#: A temporary file of :func:`atomic_write_bytes`: ``.<name>.kdt<pid>-<host>-<random>.tmp``.
_TEMP_RE = re.compile(r"\..*\.kdt(?P<pid>[0-9]{1,10})-(?P<host>[0-9a-f]{6})-[a-z0-9_]+\.tmp\Z", re.S)

#: A temporary file without a writer's PID (``.<name>.<8 random characters>.tmp``, from earlier kdtoolkit versions).
_UNMARKED_TEMP_RE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp\Z", re.S)

#: Directories this process has already cleaned of stale temporary files (once per process).
_SWEPT: set[str] = set()


def _gpu_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (a ``RuntimeError``), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.split(".")[0] == "torch"


def is_resource_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a resource error: ``MemoryError``, torch's ``OutOfMemoryError`` (GPU
    memory), or an ``OSError`` whose errno is one of :data:`RESOURCE_ERRNOS` (a full disk, a
    quota, a read-only file system, a name too long, a file too large)."""
    return (
        isinstance(exc, MemoryError)
        or _gpu_out_of_memory(exc)
        or (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS)
    )


_RESOURCE_ADVICE = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space (or raise the quota)"),
    errno.EFBIG: (
        "file too large for the file system or the process's file-size limit",
        "raise the limit or write elsewhere",
    ),
    errno.EROFS: ("read-only file system", "make it writable (or write elsewhere, e.g. another --out)"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
}


def resource_error_message(exc: BaseException) -> str | None:
    """The one-line message of a resource error (see :func:`is_resource_error`), or ``None`` for
    any other exception. It names the file (``exc.filename``), says that nothing finished was lost
    (every file is written atomically and a run resumes from its last checkpoint) and what to do."""
    if isinstance(exc, MemoryError) or _gpu_out_of_memory(exc):
        what = "out of memory (MemoryError)" if isinstance(exc, MemoryError) else "out of GPU memory"
        return (
            f"{what}; nothing finished was lost (every file is written atomically and a run resumes from its "
            "last checkpoint): free memory or use smaller batches (data.batch_size, data.eval_batch_size), then "
            "run the same command again to resume"
        )
    if not is_resource_error(exc):
        return None
    assert isinstance(exc, OSError)
    what, todo = _RESOURCE_ADVICE.get(exc.errno or 0, (exc.strerror or "resource error", "fix it"))
    where = f"{exc.filename}: " if exc.filename not in (None, "") else ""
    return (
        f"{where}{what}; nothing finished was lost (every file is written atomically and a run "
        f"resumes from its last checkpoint): {todo}, then run the same command again to resume"
    )


def _named(exc: OSError, path: Path) -> None:
    """Make ``exc`` name ``path`` (the file the user asked for, not a temporary file beside it), before it
    is raised again."""
    if exc.filename is None or str(exc.filename) != str(path):
        exc.filename = str(path)
        exc.filename2 = None


def _write_fd(fd: int, data: bytes | memoryview, path: Path) -> None:
    """Write all of ``data`` to ``fd``, an open temporary file for ``path`` or ``path`` itself (appends).

    The one place where kdtoolkit writes file contents: the fault-injection
    tests (``tests/test_hostile_writes.py``) replace it to fill the disk at
    each writer of a run in turn.
    """
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[: 1 << 30])
        view = view[n:]


def _new_temp(directory: Path, name: str) -> tuple[int, Path]:
    """Create a temporary file for ``name`` in ``directory``: ``(fd, path)``. Its name,
    ``.<name>.kdt<pid>-<host>-<random>.tmp``, tells :func:`remove_stale_temps` who writes it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name[:160]}.kdt{os.getpid()}-{_HOST}-", suffix=TEMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:  # pragma: no cover - e.g. filesystems without permissions
        pass
    return fd, Path(tmp)


def _fsync_dir(directory: Path) -> None:
    try:  # make a rename durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename.

    This is the one writer of every file kdtoolkit writes (the other
    ``atomic_*`` functions go through it). A crash at any point leaves either
    the old file or the new one, never a half-written file: a killed process
    may leave its ``.<name>.kdt<pid>-<host>-<random>.tmp`` behind, which the
    next write into that folder removes (:func:`remove_stale_temps`, once per
    folder and process). The new file gets the permissions an ordinary
    ``open()`` would give it.

    :raises OSError: naming ``path`` (``exc.filename``), e.g. on a full disk;
        the temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        fd, tmp = _new_temp(path.parent, path.name)
    except OSError as exc:
        _named(exc, path)
        raise
    try:
        try:
            _write_fd(fd, data, path)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            _named(exc, path)
        raise
    _fsync_dir(path.parent)


def atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (:func:`atomic_write_bytes`); returns ``path``.

    The figure is rendered to memory in the format of ``path``'s suffix (or
    ``format=``), then written: a process killed while a figure is rewritten
    leaves the previous figure intact. ``kwargs`` go to ``fig.savefig``
    (``dpi``, ``bbox_inches``, ...).
    """
    import io

    path = Path(path)
    kwargs.setdefault("format", path.suffix[1:].lower() or "png")
    buf = io.BytesIO()
    fig.savefig(buf, **kwargs)
    atomic_write_bytes(path, buf.getbuffer())
    return path


def atomic_save_image(image: Any, path: Path, **kwargs: Any) -> Path:
    """Save a Pillow image atomically (:func:`atomic_write_bytes`); returns ``path``. ``kwargs`` go to
    ``Image.save`` (``format`` defaults to the one of ``path``'s suffix, e.g. ``quality=95``)."""
    import io

    from PIL import Image

    path = Path(path)
    if "format" not in kwargs:
        kwargs["format"] = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    image.save(buf, **kwargs)
    atomic_write_bytes(path, buf.getbuffer())
    return path


def open_for_update(path: Path, flags: int) -> int:
    """A file descriptor of ``path`` opened in place with ``flags`` (``os.O_WRONLY | os.O_APPEND |
    os.O_CREAT`` to append, ``os.O_RDWR`` to cut back): the writes that are not a rename. A symbolic
    link is never followed (``O_NOFOLLOW``), and a FIFO, device or socket is refused without
    blocking, so a link planted in an unpacked run directory cannot redirect the write.

    :raises KdtError: one line naming ``path``, when it is a link or not a regular file.
    :raises OSError: naming ``path``, for other failures.
    """
    path = Path(path)
    nofollow, nonblock = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | nofollow | nonblock, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise KdtError(
                "refusing to write through a symbolic link (a run directory's files are its own)", source=str(path)
            ) from None
        _named(exc, path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KdtError("refusing to write: not a regular file", source=str(path))
    return fd


def append_line(path: Path, line: str) -> None:
    """Append one line of text to ``path`` (e.g. ``metrics.jsonl``), fsynced; whole or not at all.

    Appending is not a rename, so it is made safe another way: a failed write
    (a full disk) cuts the file back to its length before the line, and a line
    cut short by a killed process is removed on resume, when the stage cuts
    ``metrics.jsonl`` back to the length its checkpoint recorded.

    :raises OSError: naming ``path``.
    :raises KdtError: when ``path`` is a symbolic link or not a regular file (:func:`open_for_update`).
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = open_for_update(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_fd(fd, data, path)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            _named(exc, path)
            raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, killed but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _stale(entry: os.DirEntry, unmarked: bool, now: float) -> bool:
    m = _TEMP_RE.match(entry.name)
    if m is None and not (unmarked and _UNMARKED_TEMP_RE.match(entry.name)):
        return False
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
    except OSError:
        return False
    if m is not None and m["host"] == _HOST:
        return old or not _alive(int(m["pid"]))
    return old


def remove_stale_temps(directory: Path, *, unmarked: bool = False) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``; returns them.

    A temporary file of :func:`atomic_write_bytes` names its writer
    (``.<name>.kdt<pid>-<host>-<random>.tmp``). It is removed when that
    process no longer runs on this machine, or when it is older than
    :data:`STALE_TEMP_SECONDS` (a writer on another machine sharing the
    folder, or a PID reused since); the temporary file of a live writer, e.g.
    a concurrent command writing into the same folder, is kept.
    ``unmarked``: also remove ``.<name>.<random>.tmp`` files without a PID
    (written by earlier kdtoolkit versions) older than :data:`STALE_TEMP_SECONDS`;
    only for folders kdtoolkit owns (run and stage directories, caches).
    """
    removed: list[Path] = []
    now = time.time()
    _SWEPT.add(os.path.abspath(directory))
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)]
    except OSError:
        return removed
    for e in entries:
        if _stale(e, unmarked, now):
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
    return removed


def _sweep_once(directory: Path) -> None:
    """:func:`remove_stale_temps` on ``directory``, the first time this process writes there."""
    if os.path.abspath(directory) not in _SWEPT:
        remove_stale_temps(directory)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """The ``default`` of :func:`json.dumps` for kdtoolkit's values: a path as its string, a one-element
    tensor or array as its number; anything else is a :class:`TypeError`."""
    if isinstance(o, Path):
        return str(o)
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    if torch is not None and isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if numpy is not None and isinstance(o, (numpy.generic, numpy.ndarray)) and o.size == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: Names that moved to :mod:`kdtoolkit.foundation.limits` and :mod:`kdtoolkit.foundation.tensorfiles`, still
#: importable from here.
_MOVED = {
    **dict.fromkeys(("special_file_kind", "open_regular_file", "available_memory"), "kdtoolkit.foundation.limits"),
    **dict.fromkeys(
        (
            "CHECKSUM_KEY",
            "MAX_HEADER_BYTES",
            "content_checksum",
            "atomic_save_safetensors",
            "SafetensorsHeader",
            "read_safetensors_header",
            "read_safetensors",
            "load_external_state_dict",
            "decode_metadata",
            "read_kdt_safetensors",
            "read_kdt_metadata",
        ),
        "kdtoolkit.foundation.tensorfiles",
    ),
}


def __getattr__(name: str) -> Any:
    """A name of :data:`_MOVED`, from its module (imported on first use: no import cycle, no torch)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})
