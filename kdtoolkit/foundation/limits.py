"""Bounds on what is read: regular files only, and no more than the memory left.

A file named by a user is opened only when it is a regular file (or a link
to one): :func:`open_regular_file` refuses a FIFO, a device, a socket or a
directory before opening it (:func:`special_file_kind` says which), so
reading never blocks on a FIFO nor reads ``/dev/zero`` forever.
:func:`available_memory` tells whether data of a given size fits in the
memory left (``MemAvailable``, a cgroup limit, ``RLIMIT_AS``), so that a
hostile or sparse file of many gigabytes is refused before it is read.
Imports neither torch nor numpy.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from kdtoolkit.foundation.errors import CheckpointError, KdtError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is not a regular file (nor a link to one), without opening it:
    ``"a FIFO"``, ``"a character device"``, ``"a link to a character device (/dev/zero)"``,
    ``"a broken link"``, ``"a directory"``, ...; ``None`` for a regular file or a link to one.

    :raises FileNotFoundError: when nothing is at ``path``.
    """
    lst = os.lstat(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if stat.S_ISLNK(lst.st_mode):
            return "a broken link"
        raise
    except OSError:  # a link loop, a component that is not a folder, ...
        return "a link that cannot be followed" if stat.S_ISLNK(lst.st_mode) else "not a regular file"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    if stat.S_ISLNK(lst.st_mode):
        return f"a link to {kind} ({os.path.realpath(path)})"
    return kind


def open_regular_file(path: str | os.PathLike, error: type[KdtError] = CheckpointError) -> BinaryIO:
    """Open ``path`` for reading in binary mode, only if it is a regular file (or a link to one).

    A FIFO, a device, a socket or a directory is refused before it is opened,
    and the opened file is checked again (a file swapped meanwhile): reading
    never blocks on a FIFO nor reads ``/dev/zero`` forever.

    :raises KdtError: (of class ``error``) naming ``path`` when it is not a
        regular file ("not a regular file (a FIFO)").
    :raises OSError: when it cannot be opened (``FileNotFoundError``, ``PermissionError``, ...).
    """
    kind = special_file_kind(path)
    if kind is not None:
        raise error(f"not a regular file ({kind})", source=str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise error(f"not a regular file ({kind})", source=str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


#: The largest JSON or text file of a run directory read (``result.json``, ``run.json``, the resolved recipe).
MAX_TEXT_BYTES = 64 * 2**20


def read_text_file(path: str | os.PathLike, error: type[KdtError] = KdtError, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, a regular file (:func:`open_regular_file`) of at most ``limit`` bytes:
    a run directory's JSON files, which an unpacked run directory may have replaced with a FIFO, a link
    to ``/dev/zero`` or a huge file.

    :raises KdtError: (of class ``error``) naming ``path`` when it is not a regular file or too large.
    :raises OSError: when it cannot be opened or read; ``UnicodeDecodeError`` when it is not UTF-8.
    """
    with open_regular_file(path, error) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"too large for a run file (over {limit // 2**20} MiB)", source=str(path))
    return data.decode("utf-8")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, ``None`` without one. The page cache
    the kernel can reclaim (``inactive_file`` in ``memory.stat``, counted in ``memory.current``) counts as
    free: a container that has just read its dataset is not full."""
    try:
        rel = next((line[3:].strip() for line in proc.read_text().splitlines() if line.startswith("0::")), None)
        if rel is None:
            return None
        folder = root / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text().strip())
        return max(0, int(limit) - used + _reclaimable(folder / "memory.stat"))
    except (OSError, ValueError):
        return None


def _reclaimable(stat_file: Path) -> int:
    """``inactive_file`` of a cgroup's ``memory.stat`` (0 when absent or unreadable)."""
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "inactive_file":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _address_space_available() -> int | None:
    """Bytes of address space left under ``RLIMIT_AS`` (``ulimit -v``), ``None`` without a limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", "rb") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(0, soft - used)
    except (ImportError, OSError, ValueError, IndexError, AttributeError):
        return None


def available_memory(needed: int) -> tuple[int, str] | None:
    """The tightest memory bound that ``needed`` bytes of new tensors would cross, as
    ``(bytes available, what limits it)``; ``None`` when they fit (or nothing can be read).

    Reads (cheaply, no dependency) ``MemAvailable`` of ``/proc/meminfo``, the cgroup v2
    memory limit, and ``RLIMIT_AS`` (where loading a file also maps it: twice ``needed``).
    """
    for avail, what, factor in (
        (_meminfo_available(), "available memory (MemAvailable)", 1),
        (_cgroup_available(), "memory left under the cgroup limit", 1),
        (_address_space_available(), "address space left under RLIMIT_AS (ulimit -v)", 2),
    ):
        if avail is not None and needed * factor > avail:
            return avail // factor, what
    return None


def format_bytes(n: int) -> str:
    """``n`` bytes for a message: ``"1.5 GB"``, ``"12.0 MB"``, ``"3.2 kB"`` or ``"512 bytes"``."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
