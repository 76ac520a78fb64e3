"""Evaluation: one forward pass over the test set gives a model's records; metrics read records.

The records hold ``logits``, ``labels`` and the outputs the head lists in
``record_keys``; a head may add metadata (e.g. the latent grid a prototype
head's ``argmin`` indexes) through a ``record_meta(outputs) -> dict`` method,
called with the outputs of the first batch.
"""

from __future__ import annotations

from typing import Any

import torch

from kdtoolkit.plugin.contracts import Model
from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.plugin.instantiation import build_component
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.foundation.progress import Progress
from kdtoolkit.results.records import Records
from kdtoolkit.engine.data import batches, num_batches
from kdtoolkit.foundation.device import autocast


@torch.inference_mode()
def evaluate(
    model: Model,
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device,
    record_keys: tuple[str, ...],
    meta: dict[str, Any],
    progress: Progress | None = None,
    dist: Dist | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
) -> Records:
    """One forward pass over ``dataset``: the model's evaluation records."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "labels", *record_keys)}
    head_meta: dict[str, Any] | None = None
    n = len(dataset)
    task = (
        progress.add(f"evaluate {meta.get('stage', '')}", total=num_batches(n, batch_size, False, None))
        if progress
        else None
    )
    record_meta = getattr(model.head, "record_meta", None)
    for x, y in batches(dataset, batch_size, shuffle=False, seed=0, dist=dist, num_workers=num_workers):
        with autocast(device, precision):
            o = model(x.to(device))
        out["labels"].append(y.cpu())
        for k in ("logits", *record_keys):
            v = o[k].detach()
            out[k].append((v.float() if v.is_floating_point() else v).cpu())
        if head_meta is None and record_meta is not None:
            head_meta = dict(record_meta(o))
        if progress:
            progress.advance(task)
    if progress:
        progress.finish(task)
    tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
    if dist is not None and dist.world > 1:
        tensors = dist.gather_records(tensors, n, batch_size)
    meta = {**meta, **(head_meta or {})}
    meta["n"] = int(tensors["labels"].shape[0])
    return Records(tensors, meta)


def compute_metrics(
    stage: dict[str, Any], records: Records, reference: Records | None, plugins: PluginManager
) -> dict[str, Any]:
    """All of the stage's metrics from records (one forward pass, any thresholds)."""
    result: dict[str, Any] = {}
    for spec in stage["metrics"]:
        comp = plugins.registry("metric").get(spec["name"])
        metric = build_component(comp, spec)
        ref = reference
        if ref is None and comp.attr("requires_reference", False):
            ref = records  # a model against itself (e.g. a teacher: AJS 1 wherever it has active patches)
        result.update(metric(records, ref))
    return result
