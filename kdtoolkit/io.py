"""Safe file I/O: atomic writes, safetensors reading with clear errors.

Weights are always safetensors with string metadata. Nothing is ever
unpickled from a user-supplied file: external PyTorch state dicts are read
with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from .errors import CheckpointError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a
    half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors with string ``metadata``, atomically."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``.

    :raises CheckpointError: naming the file when it is missing, truncated,
        not safetensors, or otherwise unreadable.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError("file not found", source=str(path)) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot read: {type(exc).__name__}", source=str(path)) from None
    if len(data) < 8:
        raise CheckpointError("not a safetensors file (too short)", source=str(path))
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CheckpointError("not a safetensors file or truncated (bad header length)", source=str(path))
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("not a safetensors file (corrupt header)", source=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (corrupt header)", source=str(path))
    meta = header.get("__metadata__") or {}
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"corrupt or truncated safetensors file ({' '.join(str(exc).split())[:120]})", source=str(path)) from None
    return tensors, dict(meta)


def load_external_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights for initialisation from a ``.safetensors`` or PyTorch file.

    PyTorch files are read with ``torch.load(weights_only=True)``; a pickle
    that needs more than tensors and plain containers is refused.

    :raises CheckpointError: for unreadable files or non-tensor content.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    if not path.is_file():
        raise CheckpointError("file not found", source=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"refused or unreadable PyTorch file (only plain state dicts load safely, weights_only=True): {' '.join(str(exc).split())[:160]}",
            source=str(path),
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("expected a state dict mapping names to tensors", source=str(path))
    return obj
