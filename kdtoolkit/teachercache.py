"""A cache of the frozen teacher's outputs for un-augmented training data.

A distillation stage runs the frozen teacher on every training batch, every
epoch. Without augmentation the teacher sees the same images each epoch and,
in eval mode, returns the same outputs; a stage with
``teacher_cache = "memory"`` or ``"disk"`` computes them once, in one
un-shuffled pass over the training set, and gathers each batch's rows by
dataset index instead (see ``docs/performance.md`` for the measured
speedup). The recipe validator only accepts a cache with ``data.augment =
false`` and a teacher.

Only the outputs that the phase's losses read are kept: a loss declares them
in ``requires_teacher_outputs`` (e.g. ``("logits",)``); a teacher-using loss
that declares nothing makes the cache keep every output. Tensors keep the
dtype the teacher produced (``bf16`` under ``precision = "bf16"``).

``disk`` also writes the cache to
``DIR/<teacher stage>/teacher-cache-<key>.safetensors`` (atomically, with
JSON metadata) and reads it back in later stages and after a resume. The key
hashes the teacher's stage hash and weights file, the dataset table
(``eval_batch_size`` included), the precision, the cached output names, the
number of processes and the software versions, so a retrained teacher,
other data or another setting never meets a stale cache, and a cache read
from disk holds exactly the numbers a new pass would compute. An unreadable
or mismatched cache file is computed again (it is derived data), with a
message.

Cached outputs come from batches of ``eval_batch_size`` rather than the
training batch, so a cached run equals an uncached one up to float rounding
(both are repeatable, and both resume bit for bit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_save_safetensors, read_kdt_safetensors

CACHE_FORMAT = "kdtoolkit.teacher_cache/1"


class TeacherCache:
    """The teacher's outputs for every training image, in dataset order.

    :ivar tensors: output name → tensor ``[n, ...]`` (CPU).
    :ivar key: the cache key (see :func:`cache_key`).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], key: str):
        lengths = {int(v.shape[0]) for v in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"cached outputs have different lengths: {sorted(lengths)}")
        self.tensors = tensors
        self.key = key
        self.n = lengths.pop()

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def batch(self, indices: list[int] | torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The cached outputs of the images ``indices`` (dataset indices), on ``device``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, idx).to(device, non_blocking=True) for k, v in self.tensors.items()}


def needed_outputs(losses: Iterable[Any]) -> set[str] | None:
    """The teacher outputs that ``losses`` read, from their declarations.

    A loss declaring ``requires_teacher_outputs`` reads those names (``()``:
    only the teacher's parameters, as the global explanation loss). A loss
    with ``requires_teacher = False`` reads none. A loss declaring neither,
    or ``requires_teacher = True`` alone, may read any output.

    :returns: the set of names (empty: no teacher forward pass is needed), or
        ``None`` for "every output".
    """
    keys: set[str] = set()
    for loss in losses:
        declared = getattr(loss, "requires_teacher_outputs", None)
        if declared is not None:
            keys.update(declared)
        elif getattr(loss, "requires_teacher", None) is False:
            continue
        else:
            return None
    return keys


def cache_key(teacher_id: str, data_spec: dict[str, Any], precision: str, keys: set[str] | None,
              world: int = 1, versions: dict[str, Any] | None = None) -> str:
    """A hash of everything the cached outputs depend on (16 hex digits).

    :param teacher_id: identifies the teacher's weights (the trainer passes its
        stage hash and a hash of its ``model.safetensors``).
    :param data_spec: the stage's resolved ``data`` table; ``eval_batch_size``
        (the batches the cache is computed in) counts, ``batch_size``,
        ``num_workers`` and ``drop_last`` do not.
    :param world: the number of processes sharing the pass (their shares of
        each batch are computed separately).
    :param versions: software versions (torch, kdtoolkit, plugins).
    """
    spec = {k: v for k, v in data_spec.items() if k not in ("batch_size", "num_workers", "drop_last")}
    payload = {"teacher": teacher_id, "data": spec, "precision": precision,
               "keys": sorted(keys) if keys is not None else "*", "world": world, "versions": versions or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()  # not inference_mode: the cached tensors take part in autograd graphs later
def compute(teacher: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, keys: set[str] | None,
            device: torch.device, autocast, progress=None, task=None) -> dict[str, torch.Tensor]:
    """The teacher's outputs over ``batches`` (un-shuffled), concatenated on the CPU.

    ``keys`` selects the outputs (``None``: every tensor output).
    ``autocast`` is a zero-argument callable returning the precision context.
    """
    teacher.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for x, _ in batches:
        with autocast():
            out = teacher(x.to(device, non_blocking=True))
        names = sorted(k for k, v in out.items() if isinstance(v, torch.Tensor)) if keys is None else sorted(keys)
        for k in names:
            if k not in out:
                raise KeyError(k)
            parts.setdefault(k, []).append(out[k].detach().cpu())
        if progress is not None:
            progress.advance(task)
    return {k: torch.cat(v) for k, v in parts.items()}


def load(path: Path, key: str, n: int, keys: set[str] | None) -> tuple[TeacherCache | None, str]:
    """Read a cache file: ``(cache, "")``, or ``(None, why)`` when it is missing,
    unreadable, written for another key or does not hold ``n`` rows of every
    needed output. Never raises for a bad file."""
    if not path.is_file():
        return None, "no cache file"
    try:
        tensors, meta = read_kdt_safetensors(path, CACHE_FORMAT, "teacher cache")
    except CheckpointError as exc:
        return None, exc.message
    except Exception as exc:  # anything else a damaged file may cause: it is derived data, compute it again
        return None, f"unreadable ({type(exc).__name__})"
    if meta.get("key") != key:
        return None, "written for another teacher, dataset or setting"
    if keys is not None and not keys <= set(tensors):
        return None, f"lacks outputs {', '.join(sorted(keys - set(tensors)))}"
    if not tensors or any(v.dim() < 1 or int(v.shape[0]) != n for v in tensors.values()):
        return None, f"does not hold {n} images"
    return TeacherCache(tensors, key), ""


def save(path: Path, cache: TeacherCache, meta: dict[str, Any]) -> None:
    """Write ``cache`` atomically with JSON metadata (``format``, ``key``, ``n`` and ``meta``)."""
    md = {"format": CACHE_FORMAT, **{k: json.dumps(v) for k, v in {**meta, "key": cache.key, "n": cache.n}.items()}}
    atomic_save_safetensors(cache.tensors, path, md)


def describe(cache: TeacherCache, seconds: float | None = None) -> str:
    """``"1437 images, 12.3 MB (features, logits)"`` (+ the time it took)."""
    mb = cache.nbytes / 2**20
    took = f", computed in {seconds:.1f} s" if seconds is not None else ""
    return f"{cache.n} images, {mb:.1f} MiB ({', '.join(sorted(cache.tensors))}){took}"
