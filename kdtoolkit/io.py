"""Safe file I/O: atomic writes, safetensors reading with clear errors.

Weights are always safetensors with string metadata. Nothing is ever
unpickled from a user-supplied file: external PyTorch state dicts are read
with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from .errors import CheckpointError

# torch is imported where tensors are read or written as torch tensors: reading
# records as numpy arrays (``kdt metrics`` on records files) never imports it.
if TYPE_CHECKING:
    import numpy as np
    import torch

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of new files, as ``open()`` would give them (``mkstemp`` alone gives 0600).
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a
    half-written file (a killed process may leave a ``.<name>.*.tmp`` file
    behind; :func:`remove_stale_temps` removes those). The new file gets the
    permissions an ordinary ``open()`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
        except OSError:  # pragma: no cover - e.g. filesystems without permissions
            pass
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def remove_stale_temps(directory: Path) -> None:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left in ``directory``."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for f in entries:
        if f.name.startswith(".") and f.name.endswith(TEMP_SUFFIX) and f.is_file():
            try:
                f.unlink()
            except OSError:
                pass


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    if torch is not None and isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if numpy is not None and isinstance(o, (numpy.generic, numpy.ndarray)) and o.size == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors with string ``metadata``, atomically, with a content
    checksum in the metadata (``checksum``) that :func:`read_safetensors` verifies."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    metadata[CHECKSUM_KEY] = content_checksum(tensors, metadata)
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


#: safetensors dtypes that numpy has (``arrays="numpy"`` reads other files through torch).
_NUMPY_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"})


def read_safetensors(path: Path, arrays: str = "torch") -> tuple[dict[str, Any], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``.

    ``arrays="torch"`` (default) gives torch tensors; ``arrays="numpy"`` gives
    numpy arrays without importing torch, except for a file holding a dtype
    numpy lacks (bfloat16, float8): that one is read as torch tensors, so that
    its values keep their dtype (a metric compares a bfloat16 distance with a
    threshold rounded to bfloat16, as before).

    A file with a ``kdtoolkit.checksum`` in its metadata (every file kdtoolkit writes)
    is verified against its contents; files without one (written by other
    tools, or by kdtoolkit before 0.2) are read as they are. The checksum is
    not part of the returned metadata.

    :raises CheckpointError: naming the file when it is missing, truncated,
        not safetensors, fails its checksum, or is otherwise unreadable.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            raw_header = fh.read(header_len) if 0 < header_len <= size - 8 else b""
    except FileNotFoundError:
        raise CheckpointError("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot read: {type(exc).__name__}", source=str(path)) from None
    if len(head) < 8:
        raise CheckpointError("not a safetensors file (too short)", source=str(path))
    if header_len <= 0 or 8 + header_len > size:
        raise CheckpointError("not a safetensors file or truncated (bad header length)", source=str(path))
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("not a safetensors file (corrupt header)", source=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (corrupt header)", source=str(path))
    meta = header.get("__metadata__") or {}
    if arrays not in ("torch", "numpy"):
        raise ValueError(f"arrays must be 'torch' or 'numpy', got {arrays!r}")
    dtypes = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    numpy_direct = arrays == "numpy" and dtypes <= _NUMPY_DTYPES
    if numpy_direct:
        from safetensors.numpy import load_file as st_load_file
    else:
        from safetensors.torch import load_file as st_load_file
    try:
        # memory-mapped and copied once into the tensors (no intermediate bytes object); safetensors
        # checks every tensor's offsets against the file, so a truncated file is an error here
        tensors = st_load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OverflowError, OSError) as exc:
        raise CheckpointError(f"corrupt or truncated safetensors file ({' '.join(str(exc).split())[:120]})", source=str(path)) from None
    meta = dict(meta)
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != content_checksum(tensors, meta):
        raise CheckpointError("content checksum mismatch: the file changed after it was written (a flipped bit, "
                              "an incomplete copy or an edit); it cannot be trusted", source=str(path))
    return tensors, meta


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 2**27 and head[8:9] == b"{"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _torch_load_reason(exc: BaseException) -> str:
    """A short, one-line reason from ``torch.load``'s (long, multi-line) error."""
    text = _ANSI.sub("", str(exc))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (f"it pickles a Python object ({m.group(1)}), not only tensors; torch.load(weights_only=True) refuses it, "
                "and kdtoolkit never unpickles arbitrary objects: save a plain state dict or a .safetensors file")
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
    if not path.is_file():
        raise CheckpointError("file not found", source=str(path))
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"refused or unreadable PyTorch file: {_torch_load_reason(exc)}", source=str(path)) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("expected a state dict mapping names to tensors", source=str(path))
    return obj


def read_kdt_safetensors(path: Path, fmt: str, what: str, arrays: str = "torch") -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and JSON-decoded metadata of a kdtoolkit safetensors file of format ``fmt``.

    Every kdtoolkit file (model, checkpoint, records) stores ``format`` and
    JSON-encoded metadata values. ``arrays``: ``"torch"`` or ``"numpy"``, as
    for :func:`read_safetensors`.

    :raises CheckpointError: naming the file when it is unreadable, of another
        format (``what`` says which was expected) or has corrupt metadata.
    """
    tensors, meta = read_safetensors(Path(path), arrays)
    if meta.get("format") != fmt:
        raise CheckpointError(f"not a kdtoolkit {what} (metadata 'format' missing)", source=str(path))
    try:
        decoded = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except json.JSONDecodeError:
        raise CheckpointError("corrupt metadata", source=str(path)) from None
    return tensors, decoded
