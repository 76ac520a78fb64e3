"""A stage's datasets and the seeded batch order of every pass over them.

Training batches come from a plan of dataset indices drawn from a generator
seeded per (stage, phase, epoch), so the order never depends on the global
RNG, on how many workers load the data, or on whether the run resumed. Under
DDP every rank reads its shard of each global batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

import torch

from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.plugin.instantiation import build_component, factory_kwargs
from kdtoolkit.plugin.manager import PluginManager


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers (stage seed, phase, epoch, purpose)."""
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class StageData:
    """The datasets of a stage: augmented train, un-augmented train, test."""

    train: Any
    train_eval: Any
    test: Any
    spec: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.train.num_classes)


def dataset_params(comp: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The keys of a ``data`` table that the dataset factory ``comp`` receives: its own parameters
    (the core's keys, such as ``batch_size``, are read by the core and never passed): the rule of
    :func:`kdtoolkit.plugin.instantiation.factory_kwargs`."""
    return factory_kwargs(comp, spec)


def component_split(comp: Any, spec: dict[str, Any], split: str, *, augment: bool = False) -> Any:
    """``split`` (``train`` or ``test``) of the dataset component ``comp``, built from the ``data``
    table ``spec`` (:func:`dataset_params`); augmented only when ``augment`` is true.

    Every dataset of the toolkit (training, ``kdt evaluate``, ``predict``, ``export``, ``check``) is
    built here, so every command reads the same items with the same transforms.
    """
    return build_component(comp, spec, split, augment)


def dataset_split(spec: dict[str, Any], split: str, plugins: PluginManager, *, augment: bool = False) -> Any:
    """``split`` of the dataset that the ``data`` table ``spec`` names (``spec["dataset"]``), built by
    :func:`component_split`."""
    comp = plugins.registry("dataset").get(spec["dataset"])
    return component_split(comp, spec, split, augment=augment)


def build_data(stage: dict[str, Any], plugins: PluginManager) -> StageData:
    """The stage's datasets: augmented train (unless ``data.augment = false``), un-augmented train, test."""
    spec = dict(stage["data"])
    comp = plugins.registry("dataset").get(spec["dataset"])
    train = component_split(comp, spec, "train", augment=bool(spec.get("augment", True)))
    train_eval = component_split(comp, spec, "train")
    test = component_split(comp, spec, "test")
    return StageData(train, train_eval, test, spec)


def batch_plan(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    limit: int | None = None,
    world: int = 1,
) -> list[list[int]]:
    """The global batches (dataset indices) of one pass over ``n`` items.

    The order is a permutation drawn from a generator seeded with ``seed``
    (or ``0..n-1``). Under DDP (``world > 1``) a last batch with fewer items
    than ranks is left out, so that every rank has a share of every batch.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    idx = order.tolist()
    nb = num_batches(n, batch_size, drop_last, limit)
    plan = [idx[b * batch_size : (b + 1) * batch_size] for b in range(nb)]
    if world > 1 and plan and len(plan[-1]) < world:
        plan.pop()
    return plan


class _Failed:
    """A :class:`KdtError` raised by a dataset inside a DataLoader worker, carried to the main process."""

    def __init__(self, exc: KdtError):
        self.cls, self.message, self.source, self.key = type(exc), exc.message, exc.source, exc.key

    def reraise(self) -> None:
        try:
            exc = self.cls(self.message, source=self.source, key=self.key)
        except Exception:  # a subclass with another signature
            exc = KdtError(self.message, source=self.source, key=self.key)
        raise exc


class _Carrying(torch.utils.data.Dataset):
    """Wraps a dataset so that its :class:`KdtError` survives a worker process as one clear line."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except KdtError as exc:
            return _Failed(exc)


def _collate_carrying(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failed):
            return item
    return torch.utils.data.default_collate(items)


def batches(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    start: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    dist: Dist | None = None,
    limit: int | None = None,
    plan: list[list[int]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``dataset`` in a seeded order, from batch ``start`` on.

    ``plan`` (from :func:`batch_plan`) gives the global batches directly
    (training does; without it no item is left out). Under DDP each rank
    receives its shard of every global batch, and skips a batch whose shard
    is empty (in a pass without collectives, e.g. evaluation). The loader
    draws nothing from the global torch RNG (its base seed comes from
    ``seed``), so augmentation draws are the same whether or not a run
    resumed mid-epoch. A :class:`KdtError` raised by the dataset in a worker
    process is raised again here, unchanged.

    With ``num_workers = 0``, a dataset that has a ``get_batch(indices)``
    method (a dataset held in memory, such as ``digits``) gives each batch
    itself, without a DataLoader; it must return what collating its items
    ``[dataset[i] for i in indices]`` would, drawing the same random numbers
    in the same order.
    """
    world = dist.world if dist is not None else 1
    if plan is None:
        plan = batch_plan(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, limit=limit)
    plan = plan[start:]
    if dist is not None and world > 1:  # world > 1 only with a dist
        plan = [p[dist.rank :: world] for p in plan]
        plan = [p for p in plan if p]
    if not plan:
        return
    fetch = getattr(dataset, "get_batch", None) if num_workers == 0 else None
    if fetch is not None:  # a dataset held in memory collates its own batches (see docs/plugins.md)
        for indices in plan:
            yield fetch(indices)
        return
    if num_workers > 0:
        dataset, collate = _Carrying(dataset), _collate_carrying
    else:
        collate = None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    for batch in loader:
        if isinstance(batch, _Failed):
            batch.reraise()
        yield batch


def num_batches(n: int, batch_size: int, drop_last: bool, limit: int | None) -> int:
    """Batches of one pass over ``n`` items."""
    nb = n // batch_size if drop_last else math.ceil(n / batch_size)
    return min(nb, limit) if limit is not None else nb
