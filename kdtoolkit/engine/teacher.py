"""The frozen teacher of a stage, live or cached, in one place.

The teacher is built from its stage's recipe table, loaded strictly from its
``model.safetensors``, placed on the device in eval mode with every parameter
frozen, and run without gradients. A phase whose losses read no teacher
output and no teacher tap skips its forward pass. Declared teacher taps are
captured by forward hooks on a live teacher and stored in the cache
(``tap/<name>``) when one is used, so a cached stage never reads stale
features.

The cache of the frozen teacher's outputs, for un-augmented training data:

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
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch
from torch import nn

from kdtoolkit.plugin.contracts import Model
from kdtoolkit.foundation.errors import CheckpointError, TrainingError
from kdtoolkit.foundation.io import remove_stale_temps
from kdtoolkit.foundation.tensorfiles import atomic_save_safetensors, read_kdt_safetensors
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.data import StageData, num_batches
from kdtoolkit.engine.data import batches as iterate_batches
from kdtoolkit.engine.models import build_model, load_model_file, load_state_strict
from kdtoolkit.engine.taps import Taps, capturing

#: Prefix of cached teacher taps among the cache's tensors.
TAP_PREFIX = "tap/"


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


def cache_key(
    teacher_id: str,
    data_spec: dict[str, Any],
    precision: str,
    keys: set[str] | None,
    world: int = 1,
    versions: dict[str, Any] | None = None,
    taps: dict[str, str] | None = None,
) -> str:
    """A hash of everything the cached outputs depend on (16 hex digits).

    :param teacher_id: identifies the teacher's weights (the trainer passes its
        stage hash and a hash of its ``model.safetensors``).
    :param data_spec: the stage's resolved ``data`` table; ``eval_batch_size``
        (the batches the cache is computed in) counts, ``batch_size``,
        ``num_workers``, ``drop_last`` and ``cache_mb`` do not.
    :param world: the number of processes sharing the pass (their shares of
        each batch are computed separately).
    :param versions: software versions (torch, kdtoolkit, plugins).
    :param taps: the cached teacher taps (name → module path), if any.
    """
    spec = {k: v for k, v in data_spec.items() if k not in ("batch_size", "num_workers", "drop_last", "cache_mb")}
    payload = {
        "teacher": teacher_id,
        "data": spec,
        "precision": precision,
        "keys": sorted(keys) if keys is not None else "*",
        "world": world,
        "versions": versions or {},
    }
    if taps:
        payload["taps"] = dict(sorted(taps.items()))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()  # not inference_mode: the cached tensors take part in autograd graphs later
def compute(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    keys: set[str] | None,
    device: torch.device,
    autocast,
    progress=None,
    task=None,
    taps: Taps | None = None,
) -> dict[str, torch.Tensor]:
    """The teacher's outputs over ``batches`` (un-shuffled), concatenated on the CPU.

    ``keys`` selects the outputs (``None``: every tensor output).
    ``autocast`` is a zero-argument callable returning the precision context.
    With ``taps``, every tap is stored too, as ``tap/<name>``.
    """
    teacher.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for x, _ in batches:
        with autocast(), capturing(taps) as feats:
            out = teacher(x.to(device, non_blocking=True))
        names = sorted(k for k, v in out.items() if isinstance(v, torch.Tensor)) if keys is None else sorted(keys)
        for k in names:
            if k not in out:
                raise KeyError(k)
            parts.setdefault(k, []).append(out[k].detach().cpu())
        for k, v in feats.items():
            parts.setdefault(TAP_PREFIX + k, []).append(v.detach().cpu())
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


# ---------------------------------------------------------------------------
# the teacher of a stage


def load_teacher(ctx: RunContext, teacher_stage: dict[str, Any], num_classes: int, path: Path) -> Model:
    """The teacher built from its stage's table, its weights loaded strictly from ``path``, frozen, in eval mode."""
    teacher = build_model(teacher_stage, num_classes, ctx.plugins)
    state, _ = load_model_file(path)
    load_state_strict(teacher, state, str(path))
    ctx.place(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TeacherSource:
    """The teacher's outputs and taps for the batches of one train phase.

    :param teacher: the frozen teacher.
    :param taps: hooks for the teacher taps the phase's losses read, or ``None``.
    :param cache: the stage's :class:`TeacherCache`, or ``None`` for a live teacher.
    :param run: whether a live teacher runs at all (some loss reads an output or a tap).
    """

    def __init__(self, teacher: Model, taps: Taps | None, cache: TeacherCache | None, run: bool):
        self.teacher = teacher
        self.taps = taps
        self.cache = cache
        self.run = run

    def batch(self, x: torch.Tensor, indices: list[int], device: torch.device) -> tuple[dict | None, dict]:
        """``(outputs, taps)`` of the teacher for the batch ``x`` (dataset ``indices``)."""
        if self.cache is not None:
            got = self.cache.batch(indices, device)
            feats = {k[len(TAP_PREFIX) :]: v for k, v in got.items() if k.startswith(TAP_PREFIX)}
            return {k: v for k, v in got.items() if not k.startswith(TAP_PREFIX)}, feats
        if not self.run:
            return None, {}
        with torch.no_grad(), capturing(self.taps) as feats:
            out = self.teacher(x)
        return out, dict(feats)


class TeacherCaches:
    """The run's teacher caches: the last one built stays in memory while a later
    stage may use it (e.g. ablations sharing a teacher and data); with ``disk``
    the file in the teacher's stage directory is read, or written by rank 0."""

    def __init__(self, ctx: RunContext, versions: dict[str, Any]):
        self.ctx = ctx
        self.versions = versions
        self.current: TeacherCache | None = None
        self.user: str | None = None
        self._file_hashes: dict[tuple, str] = {}

    def get(
        self,
        name: str,
        st: dict[str, Any],
        teacher: Model,
        data: StageData,
        needs: set[str] | None,
        taps: Taps | None,
        teacher_hash: str,
        teacher_dir: Path,
    ) -> TeacherCache:
        """The teacher's outputs ``needs`` (and ``taps``) for every training image of stage ``name``."""
        ctx, tapmap = self.ctx, (taps.taps if taps else {})
        key = cache_key(
            self._file_id(teacher_hash, teacher_dir / "model.safetensors"),
            st["data"],
            ctx.precision,
            needs,
            ctx.dist.world,
            self.versions,
            tapmap,
        )
        path = teacher_dir / f"teacher-cache-{key}.safetensors"
        meta = {
            "teacher": st["teacher"],
            "teacher_stage_hash": teacher_hash,
            "data": st["data"],
            "precision": ctx.precision,
            "world_size": ctx.dist.world,
            "versions": self.versions,
            "taps": tapmap,
        }
        disk = st["teacher_cache"] == "disk"
        if self.current is not None and self.current.key == key:
            self._reuse(name, path, meta, disk)
            return self.current
        self.current = None  # free the previous one before building another
        n = len(data.train)
        wanted = None if needs is None else set(needs) | {TAP_PREFIX + t for t in tapmap}
        cache = self._read(name, path, key, n, wanted) if disk else None
        if cache is None:
            cache = self._compute(name, st, teacher, data, needs, taps, key)
            if disk:
                self._write(name, path, cache, meta)
        self.current, self.user = cache, name
        return cache

    def _reuse(self, name: str, path: Path, meta: dict[str, Any], disk: bool) -> None:
        assert self.current is not None  # called only with a current cache
        if self.user == name:
            return
        self.user = name
        self.ctx.progress.log(
            f"stage [bold]{name}[/]: teacher outputs from the cache built for an earlier stage "
            f"({describe(self.current)})"
        )
        if disk:
            if self.ctx.dist.is_main and not path.is_file():
                self._save(name, path, self.current, meta)
            self.ctx.dist.barrier()  # every rank, whatever it sees on disk

    def _read(self, name: str, path: Path, key: str, n: int, wanted: set[str] | None) -> TeacherCache | None:
        cache, why = load(path, key, n, wanted)
        if self.ctx.dist.any(cache is None):
            if cache is None and path.exists():
                self.ctx.progress.log(f"stage [bold]{name}[/]: teacher cache {path} {why}; computing it again")
            return None
        assert cache is not None  # a None here would have made dist.any(...) true on this rank
        self.ctx.progress.log(f"stage [bold]{name}[/]: teacher outputs read from {path.name} ({describe(cache)})")
        return cache

    def _compute(
        self,
        name: str,
        st: dict[str, Any],
        teacher: Model,
        data: StageData,
        needs: set[str] | None,
        taps: Taps | None,
        key: str,
    ) -> TeacherCache:
        ctx = self.ctx
        t0 = time.perf_counter()
        n, ebs = len(data.train), data.spec["eval_batch_size"]
        task = ctx.progress.add(f"{name} · teacher cache", total=num_batches(n, ebs, False, None))
        it = iterate_batches(
            data.train, ebs, shuffle=False, seed=0, num_workers=data.spec["num_workers"], dist=ctx.dist
        )
        try:
            tensors = compute(
                teacher,
                it,
                keys=needs,
                device=ctx.device,
                autocast=ctx.autocast,
                progress=ctx.progress,
                task=task,
                taps=taps,
            )
        except KeyError as exc:
            raise TrainingError(
                f"stage '{name}': the teacher ('{st['teacher']}') does not produce output {exc}, "
                "which a loss of this stage reads"
            ) from None
        ctx.progress.finish(task)
        if ctx.dist.world > 1:
            tensors = ctx.dist.gather_records(tensors, n, ebs)
        cache = TeacherCache(tensors, key)
        where = "on disk" if st["teacher_cache"] == "disk" else "in memory"
        ctx.progress.log(
            f"stage [bold]{name}[/]: teacher outputs cached {where} ({describe(cache, time.perf_counter() - t0)})"
        )
        return cache

    def _write(self, name: str, path: Path, cache: TeacherCache, meta: dict[str, Any]) -> None:
        if self.ctx.dist.is_main:
            self._save(name, path, cache, meta)
        self.ctx.dist.barrier()

    def _save(self, name: str, path: Path, cache: TeacherCache, meta: dict[str, Any]) -> None:
        """Write a cache file; a full or read-only disk leaves the run going with the cache in memory."""
        try:
            remove_stale_temps(path.parent)  # of an earlier writer that was killed
            save(path, cache, meta)
        except OSError as exc:
            self.ctx.progress.log(
                f"stage [bold]{name}[/]: could not write the teacher cache {path} "
                f"({exc.strerror or type(exc).__name__}); going on with it in memory"
            )

    def release(self, after: str, order: list[str], stages: dict[str, Any]) -> None:
        """Drop the cache held in memory unless a stage after ``after`` may use it (same teacher, a cache on)."""
        if self.current is None:
            return
        later = order[order.index(after) + 1 :] if after in order else []
        teacher = stages[after].get("teacher")
        if not any(stages[s].get("teacher") == teacher and stages[s]["teacher_cache"] != "off" for s in later):
            self.current = self.user = None

    def _file_id(self, teacher_hash: str, path: Path) -> str:
        """The teacher's stage hash and a hash of its ``model.safetensors`` (hashed once per file version)."""
        stat = path.stat() if path.is_file() else None
        ident = (str(path), stat.st_size, stat.st_mtime_ns) if stat else (str(path), None, None)
        if self._file_hashes.get(ident) is None:
            h = hashlib.sha256()
            if stat:
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._file_hashes[ident] = h.hexdigest()
        return f"{teacher_hash}:{self._file_hashes[ident]}"
