"""Safetensors files: written atomically with a content checksum, read with bounds and clear errors.

Weights, checkpoints and records are always safetensors with string
metadata; every file kdtoolkit writes (:func:`atomic_save_safetensors`,
through :func:`kdtoolkit.foundation.io.atomic_write_bytes`) carries a content checksum
(:data:`CHECKSUM_KEY`) that :func:`read_safetensors` verifies. A file's
header is checked against the file (its real size, dtypes, shapes, offsets;
regular files only), and the tensors against the memory left
(:mod:`kdtoolkit.foundation.limits`), before any tensor is read. Nothing is ever
unpickled from a user-supplied file: external PyTorch state dicts
(:func:`load_external_state_dict`) are read with
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable

from safetensors import SafetensorError

from kdtoolkit.foundation.errors import CheckpointError, KdtError
from kdtoolkit.foundation.io import atomic_write_bytes
from kdtoolkit.foundation.limits import available_memory, format_bytes, open_regular_file, special_file_kind

# torch is imported where tensors are read or written as torch tensors: reading
# records as numpy arrays (``kdt metrics`` on records files) never imports it.
if TYPE_CHECKING:
    import torch

#: Metadata key of the content checksum every file written by :func:`atomic_save_safetensors` carries.
CHECKSUM_KEY = "kdtoolkit.checksum"


def _dtype_and_bytes(t: Any) -> tuple[str, memoryview | None]:
    """The torch name of the dtype (``torch.float32``) and the raw bytes of a torch
    tensor or a numpy array (``None`` when empty): the same for both of one content."""
    if hasattr(t, "detach"):  # a torch tensor
        import torch

        t = t.detach().contiguous().cpu()
        return str(t.dtype), (memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else None)
    import numpy as np

    t = np.ascontiguousarray(t)
    return f"torch.{t.dtype.name}", (memoryview(t.reshape(-1).view(np.uint8)) if t.size else None)


def content_checksum(tensors: dict[str, Any], metadata: dict[str, str]) -> str:
    """``crc32:<8 hex digits>`` of every tensor's name, dtype, shape and bytes (in name order)
    and of the metadata (without the checksum itself). Tensors are torch tensors or numpy
    arrays; an array gives the same checksum as the tensor of the same dtype and content."""
    crc = 0
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            crc = zlib.crc32(f"{key}={metadata[key]}\n".encode(), crc)
    for name in sorted(tensors):
        dtype, data = _dtype_and_bytes(tensors[name])
        crc = zlib.crc32(f"{name}:{dtype}:{tuple(tensors[name].shape)}\n".encode(), crc)
        if data is not None:
            crc = zlib.crc32(data, crc)
    return f"crc32:{crc:08x}"


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` as safetensors with string ``metadata``, atomically, with a content
    checksum in the metadata (``checksum``) that :func:`read_safetensors` verifies."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    metadata[CHECKSUM_KEY] = content_checksum(tensors, metadata)
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


#: safetensors dtypes that numpy has (``arrays="numpy"`` reads other files through torch).
_NUMPY_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"})

#: Bits per element of each safetensors dtype: a header naming another dtype is refused.
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

#: The largest safetensors header read (the safetensors library's own limit), in bytes.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of a safetensors file, checked against the file before any tensor is read.

    :ivar path: the file.
    :ivar tensors: name → ``(dtype, shape)``, with safetensors dtype names (``F32``, ``I64``, ...).
    :ivar metadata: the string metadata (``__metadata__``), a checksum included.
    :ivar data_bytes: bytes of tensor data: what loading the tensors takes in memory.
    :ivar file_size: the file's size in bytes (its apparent size, for a sparse file).
    :ivar disk_bytes: bytes the file takes on disk (``st_blocks * 512``; far below
        ``file_size`` for a sparse file, whose holes read as zeros).
    """

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    data_bytes: int
    file_size: int
    disk_bytes: int

    def sparse_note(self) -> str:
        """``" (the file is sparse: 4.1 kB on disk of its 4.0 GB)"``, or ``""`` for a file mostly on disk."""
        if self.file_size >= 2**26 and self.disk_bytes * 4 < self.file_size:
            return (
                f" (the file is sparse: {format_bytes(self.disk_bytes)} on disk of its {format_bytes(self.file_size)})"
            )
        return ""


def _entry(name: str, e: Any, bad) -> tuple[int, int, str, str, tuple[int, ...]]:
    """``(begin, end, name, dtype, shape)`` of a header entry, each value checked against the others."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise bad(f"tensor '{name}' must list dtype, shape and data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in _DTYPE_BITS:
        raise bad(f"tensor '{name}' has an unknown dtype {dtype!r}")

    def natural(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    if not isinstance(shape, list) or len(shape) > 64 or not all(natural(d) for d in shape):
        raise bad(f"tensor '{name}' has a bad shape {str(shape)[:60]} (expected at most 64 sizes >= 0)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(natural(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(
            f"tensor '{name}' has bad data_offsets {str(offsets)[:60]} (expected [begin, end], 0 <= begin <= end)"
        )
    bits = _DTYPE_BITS[dtype]
    for d in shape:
        bits *= d
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise bad(
            f"tensor '{name}' ({dtype} {tuple(shape)}) takes {bits / 8:g} bytes, but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], name, dtype, tuple(shape)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, without reading any tensor.

    Every entry's dtype, shape and ``data_offsets`` must agree, the tensors
    must lie end to end from the start of the data without gaps or overlaps,
    and the data must end exactly at the end of the file (its real size, read
    with ``fstat``). A header over :data:`MAX_HEADER_BYTES`, or JSON nested
    too deeply to parse, is refused.

    :raises CheckpointError: naming the file for a missing, special (FIFO,
        device), short, truncated or inconsistent file.
    """
    path = Path(path)
    src = str(path)
    try:
        fh = open_regular_file(path)
    except FileNotFoundError:
        raise CheckpointError("file not found", source=src) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {type(exc).__name__}", source=src) from None
    with fh:
        st = os.fstat(fh.fileno())
        size = st.st_size
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError("not a safetensors file (too short)", source=src)
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError("not a safetensors file or truncated (bad header length)", source=src)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"not a safetensors file (a header of {format_bytes(header_len)}, "
                f"over the {format_bytes(MAX_HEADER_BYTES)} limit)",
                source=src,
            )
        raw_header = fh.read(header_len)
    if len(raw_header) < header_len:
        raise CheckpointError("not a safetensors file or truncated (bad header length)", source=src)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("not a safetensors file (corrupt header)", source=src) from None
    except RecursionError:
        raise CheckpointError("not a safetensors file (corrupt header: JSON nested too deeply)", source=src) from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (corrupt header)", source=src)

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"inconsistent safetensors header: {message}", source=src)

    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map names to strings")
    entries = sorted(_entry(k, v, bad) for k, v in header.items() if k != "__metadata__")
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise bad(
                f"tensor '{name}' starts at byte {begin} of the data, not at {end} where the previous one ends "
                "(tensors lie end to end, without gaps or overlaps)"
            )
        end = stop
    held = size - 8 - header_len
    if end != held:
        what = "truncated" if end > held else "with data after the last tensor"
        raise CheckpointError(
            f"corrupt or {what} safetensors file: the header lists {end} bytes of tensor data, the file holds {held}",
            source=src,
        )
    return SafetensorsHeader(
        path,
        {name: (dtype, shape) for _, _, name, dtype, shape in entries},
        dict(meta),
        end,
        size,
        getattr(st, "st_blocks", size // 512 + 1) * 512,
    )


def _check_loadable(
    header: SafetensorsHeader,
    require: Iterable[str],
    fmt: str | None,
    what: str,
    check: Callable[[dict[str, tuple[int, ...]], str], None] | None,
) -> None:
    """``require``d names, the ``format`` metadata, ``check`` (on the shapes) and the memory the tensors
    take, from the header alone."""
    src = str(header.path)
    if fmt is not None and header.metadata.get("format") != fmt:
        raise CheckpointError(f"not a kdtoolkit {what} (metadata 'format' missing)" + header.sparse_note(), source=src)
    missing = [n for n in require if n not in header.tensors]
    if missing:
        have = ", ".join(sorted(header.tensors)[:5]) or "none"
        raise CheckpointError(
            f"the {what} has no tensor {', '.join(repr(n) for n in missing)} (tensors: {have}"
            f"{', ...' if len(header.tensors) > 5 else ''})" + header.sparse_note(),
            source=src,
        )
    if check is not None:
        check({name: shape for name, (_, shape) in header.tensors.items()}, src)
    short = available_memory(header.data_bytes)
    if short is not None:
        raise CheckpointError(
            f"its tensors take {format_bytes(header.data_bytes)}, more than the {format_bytes(short[0])} of "
            f"{short[1]}; it was not read" + header.sparse_note(),
            source=src,
        )


def read_safetensors(
    path: Path,
    arrays: str = "torch",
    *,
    require: Iterable[str] = (),
    fmt: str | None = None,
    what: str = "safetensors file",
    check: Callable[[dict[str, tuple[int, ...]], str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``.

    ``arrays="torch"`` (default) gives torch tensors; ``arrays="numpy"`` gives
    numpy arrays without importing torch, except for a file holding a dtype
    numpy lacks (bfloat16, float8): that one is read as torch tensors, so that
    its values keep their dtype (a metric compares a bfloat16 distance with a
    threshold rounded to bfloat16, as before).

    Before any tensor is read, the header is checked against the file
    (:func:`read_safetensors_header`), then ``require`` (tensor names the
    caller needs), ``fmt`` (the ``format`` metadata of a kdtoolkit file,
    ``what`` naming it in messages) and ``check`` (called with every tensor's
    shape and the file name; it raises to refuse) are checked from the header, and a file
    whose tensors would not fit in the memory left (``MemAvailable``, a
    cgroup limit, ``RLIMIT_AS``) is refused: a hostile or sparse file of many
    gigabytes is never read.

    A file with a ``kdtoolkit.checksum`` in its metadata (every file kdtoolkit writes)
    is verified against its contents; files without one (written by other
    tools, or by kdtoolkit before 0.2) are read as they are. The checksum is
    not part of the returned metadata.

    :raises CheckpointError: naming the file when it is missing, not a regular
        file, truncated, not safetensors, inconsistent, lacks a required
        tensor, is too large for the memory left, fails its checksum, or is
        otherwise unreadable.
    """
    path = Path(path)
    if arrays not in ("torch", "numpy"):
        raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
    header = read_safetensors_header(path)
    _check_loadable(header, tuple(require), fmt, what, check)
    dtypes = {dtype for dtype, _ in header.tensors.values()}
    numpy_direct = arrays == "numpy" and dtypes <= _NUMPY_DTYPES
    st_load_file: Callable[[str], dict[str, Any]]
    if numpy_direct:
        from safetensors.numpy import load_file as st_load_file
    else:
        from safetensors.torch import load_file as st_load_file
    try:
        # memory-mapped and copied once into the tensors (no intermediate bytes object); safetensors
        # checks every tensor's offsets against the file again, so a file truncated meanwhile is an error here
        tensors = st_load_file(str(path))
    except MemoryError:
        raise CheckpointError(
            f"out of memory loading {format_bytes(header.data_bytes)} of tensors" + header.sparse_note(),
            source=str(path),
        ) from None
    except (SafetensorError, ValueError, RuntimeError, OverflowError, OSError) as exc:
        raise CheckpointError(
            f"corrupt or truncated safetensors file ({' '.join(str(exc).split())[:120]})", source=str(path)
        ) from None
    meta = dict(header.metadata)
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != content_checksum(tensors, meta):
        raise CheckpointError(
            "content checksum mismatch: the file changed after it was written (a flipped bit, "
            "an incomplete copy or an edit); it cannot be trusted",
            source=str(path),
        )
    return tensors, meta


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open_regular_file(path) as fh:
            head = fh.read(9)
    except (OSError, KdtError):
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 2**27 and head[8:9] == b"{"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _torch_load_reason(exc: BaseException) -> str:
    """A short, one-line reason from ``torch.load``'s (long, multi-line) error."""
    text = _ANSI.sub("", str(exc))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (
            f"it pickles a Python object ({m.group(1)}), not only tensors; torch.load(weights_only=True) refuses it, "
            "and kdtoolkit never unpickles arbitrary objects: save a plain state dict or a .safetensors file"
        )
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [l.strip() for l in text.replace("WeightsUnpickler error:", "\n").splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(boiler)]
    detail = (useful[0] if useful else type(exc).__name__).split(". ")[0].rstrip(".")
    return f"not a PyTorch state dict file, or a corrupt one ({detail[:160]})"


def load_external_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights for initialisation from a ``.safetensors`` or PyTorch file.

    A safetensors file (recognised by its suffix or its content) is read
    without any pickle. A PyTorch file is read with
    ``torch.load(weights_only=True)``: a pickle that needs more than tensors
    and plain containers (e.g. a pickled custom class) is refused, and nothing
    in it is executed.

    :raises CheckpointError: for unreadable files or non-tensor content.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return read_safetensors(path)[0]
    try:
        kind = special_file_kind(path)
    except FileNotFoundError:
        raise CheckpointError("file not found", source=str(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read: {type(exc).__name__}", source=str(path)) from None
    if kind is not None:
        raise CheckpointError(f"not a regular file ({kind})", source=str(path))
    short = available_memory(path.stat().st_size)
    if short is not None:
        raise CheckpointError(
            f"the file takes {format_bytes(path.stat().st_size)}, more than the {format_bytes(short[0])} of "
            f"{short[1]}; it was not read",
            source=str(path),
        )
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise CheckpointError("out of memory loading the file", source=str(path)) from None
    except Exception as exc:
        raise CheckpointError(
            f"refused or unreadable PyTorch file: {_torch_load_reason(exc)}", source=str(path)
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("expected a state dict mapping names to tensors", source=str(path))
    return obj


def decode_metadata(meta: dict[str, str], source: str) -> dict[str, Any]:
    """JSON-decoded metadata values (all but ``format``) of a kdtoolkit safetensors file.

    :raises CheckpointError: naming ``source`` for a value that is not JSON or is nested too deeply.
    """
    try:
        return {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except json.JSONDecodeError:
        raise CheckpointError("corrupt metadata", source=source) from None
    except RecursionError:
        raise CheckpointError("corrupt metadata (JSON nested too deeply)", source=source) from None


def read_kdt_safetensors(
    path: Path,
    fmt: str,
    what: str,
    arrays: str = "torch",
    *,
    require: Iterable[str] = (),
    check: Callable[[dict[str, tuple[int, ...]], str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and JSON-decoded metadata of a kdtoolkit safetensors file of format ``fmt``.

    Every kdtoolkit file (model, checkpoint, records) stores ``format`` and
    JSON-encoded metadata values. ``arrays``: ``"torch"`` or ``"numpy"``, as
    for :func:`read_safetensors`. The format, the ``require``d tensor
    names and ``check`` (on the shapes) are checked from the header, before
    any tensor is read.

    :raises CheckpointError: naming the file when it is unreadable, of another
        format (``what`` says which was expected), lacks a required tensor, is
        too large for the memory left or has corrupt metadata.
    """
    tensors, meta = read_safetensors(Path(path), arrays, require=require, fmt=fmt, what=what, check=check)
    return tensors, decode_metadata(meta, str(path))


def read_kdt_metadata(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON-decoded metadata of a kdtoolkit safetensors file of format ``fmt``, from its header
    alone (no tensor is read; the content checksum is not verified).

    :raises CheckpointError: as :func:`read_kdt_safetensors`.
    """
    header = read_safetensors_header(Path(path))
    if header.metadata.get("format") != fmt:
        raise CheckpointError(f"not a kdtoolkit {what} (metadata 'format' missing)", source=str(path))
    return decode_metadata({k: v for k, v in header.metadata.items() if k != CHECKSUM_KEY}, str(path))
