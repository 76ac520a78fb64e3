"""Evaluation records: per-image model outputs over a test set, as safetensors.

One forward pass of a model over the (un-augmented) test set gives its
records: ``logits`` ``[N,K]``, ``labels`` ``[N]`` and whatever the head lists
in ``record_keys`` (the ProtoPNet and ProtoTree heads add ``min_distances`` ``[N,P]`` and
``argmin`` ``[N,P]``). Every metric is computed from records, so any number of
thresholds costs no extra forward pass. Records are saved as safetensors with
JSON-valued string metadata (``stage``, ``dataset``, ``H``, ``W``, ...): safe
to share and fast to load; nothing is ever unpickled. Records load as torch
tensors, or as numpy arrays without importing torch (``arrays="numpy"``:
what ``kdt metrics`` reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdtoolkit.foundation.errors import CheckpointError
from kdtoolkit.foundation.tensorfiles import atomic_save_safetensors, read_kdt_safetensors

if TYPE_CHECKING:
    import torch

RECORDS_FORMAT = "kdtoolkit.results.records/1"


@dataclass
class Records:
    """Per-image outputs of one model over a dataset.

    :ivar tensors: name → tensor (torch, or numpy after :meth:`numpy` or
        ``load(..., arrays="numpy")``), all with the same first dimension N.
    :ivar meta: JSON-serialisable metadata (``stage``, ``dataset``,
        ``num_classes``, ``H``, ``W``, ...).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    @property
    def n(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as safetensors (metadata values JSON-encoded; torch tensors or numpy arrays)."""
        import torch

        meta = {"format": RECORDS_FORMAT, **{k: json.dumps(v) for k, v in self.meta.items()}}
        tensors = {
            k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).contiguous().cpu()
            for k, v in self.tensors.items()
        }
        atomic_save_safetensors(tensors, Path(path), meta)

    def numpy(self) -> Records:
        """The same records with numpy arrays (CPU copies of torch tensors; bfloat16, which
        numpy lacks, becomes float32, which holds its values exactly)."""

        def as_array(v: Any) -> Any:
            if not hasattr(v, "detach"):
                return v
            v = v.detach().cpu()
            return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()

        return Records({k: as_array(v) for k, v in self.tensors.items()}, dict(self.meta))

    @classmethod
    def load(cls, path: str | os.PathLike, arrays: str = "torch", require: tuple[str, ...] | list[str] = ()) -> Records:
        """Read a records file, as torch tensors or (``arrays="numpy"``) as numpy arrays
        without importing torch (a file with a dtype numpy lacks, e.g. bfloat16, still gives
        torch tensors; see :func:`~kdtoolkit.foundation.tensorfiles.read_safetensors`).

        The format, the tensors ``labels``, ``logits`` and ``require`` (e.g. a metric's
        ``min_distances``) and the shapes (one row per image in every tensor) are checked
        from the file's header before any tensor is read, so a foreign or hostile file of
        any size is refused at once.

        :raises CheckpointError: for a missing, truncated, foreign or inconsistent file.
        """
        path = Path(path)
        tensors, decoded = read_kdt_safetensors(
            path, RECORDS_FORMAT, "records file", arrays, require=("labels", "logits", *require), check=_check_shapes
        )
        _check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, str(path))
        return cls(tensors, decoded)


def _check_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """``labels`` is ``[N]`` and every tensor has ``N`` rows (``shapes``: name → shape)."""
    if len(shapes["labels"]) != 1:
        raise CheckpointError(f"'labels' must be [N], got shape {tuple(shapes['labels'])}", source=source)
    n = shapes["labels"][0]
    for k, shape in shapes.items():
        if len(shape) == 0 or shape[0] != n:
            raise CheckpointError(f"tensor '{k}' has {tuple(shape)} rows, expected {n}", source=source)
