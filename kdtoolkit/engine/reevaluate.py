"""Evaluate a trained stage on another split or dataset: ``kdt evaluate``.

The stage's ``data`` table is changed by ``KEY=VALUE`` assignments (naming
another ``dataset`` starts from that dataset's defaults, keeping only the
core keys such as ``eval_batch_size``), validated as a recipe's would be,
and the chosen split is evaluated with the stage's model. The stage's
metrics are computed from the new records; a metric that compares with the
stage's reference (teacher or ``compare_to`` stage) gets the reference
model's records on the same data. Everything is written to a new folder,
never over the stage's own files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import DataError, KdtError, RecipeError
from ..io import atomic_write_json
from ..records import Records
from .rundir import StageDir

#: Splits ``kdt evaluate`` can read.
SPLITS = ("test", "train")


def data_spec(stage: StageDir, assignments: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The stage's ``data`` table with ``KEY=VALUE`` assignments applied, validated.

    :raises RecipeError: (source ``--data``) for a malformed assignment, an
        unknown key or a bad value.
    """
    from ..recipe import parse_override_value
    from ..validate import DATA_KEYS, Validator

    raw = dict(stage.spec["data"])
    parsed = []
    for a in assignments:
        key, eq, value = a.partition("=")
        key = key.strip()
        if not eq or not key or "." in key or "[" in key:
            raise RecipeError(f"expected KEY=VALUE with a key of the data table, got {a!r}", source="--data")
        parsed.append((key, parse_override_value(value.strip())))
    new_dataset = dict(parsed).get("dataset")
    if new_dataset is not None and new_dataset != raw.get("dataset"):
        raw = {k: v for k, v in raw.items() if k in DATA_KEYS}
    for key, value in parsed:
        raw[key] = value
    return Validator("--data", stage.run.plugins).data(raw, "data")


def _split_dataset(spec: dict[str, Any], split: str, plugins) -> Any:
    comp = plugins.registry("dataset").get(spec["dataset"])
    return comp.factory(split, False, **{k: v for k, v in spec.items() if k in comp.params})


def default_out(stage: StageDir, spec: dict[str, Any], split: str) -> Path:
    """``<stage>/evaluations/<dataset>-<split>-<8 hex digits of the data table>``."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return stage.path / "evaluations" / f"{spec['dataset']}-{split}-{digest}"


def _records(stage: StageDir, dataset: Any, spec: dict[str, Any], split: str, device: str, progress) -> Records:
    from .device import resolve_device
    from .evaluation import evaluate

    expected = stage.num_classes()
    if int(dataset.num_classes) != expected:
        raise DataError(f"the data has {dataset.num_classes} classes, stage '{stage.name}' was trained on {expected}",
                        source="--data", key="dataset")
    dev = resolve_device(device)
    model = stage.model(str(dev))
    head = stage.run.plugins.registry("head").get(stage.spec["model"]["head"]["name"])
    return evaluate(model, dataset, batch_size=spec["eval_batch_size"], device=dev,
                    record_keys=tuple(head.attr("record_keys", ())), progress=progress,
                    num_workers=spec["num_workers"],
                    meta={"stage": stage.name, "dataset": getattr(dataset, "name", spec["dataset"]),
                          "split": split, "num_classes": int(dataset.num_classes)})


def evaluate_stage(stage: StageDir, assignments: tuple[str, ...] | list[str] = (), *, split: str = "test",
                   out: Path | None = None, device: str = "auto", progress=None) -> dict[str, Any]:
    """Evaluate ``stage`` on ``split`` of its (changed) data and write the results.

    :param stage: a finished stage.
    :param assignments: ``KEY=VALUE`` changes to the stage's ``data`` table.
    :param split: ``test`` or ``train`` (un-augmented).
    :param out: output folder (default :func:`default_out`); it receives
        ``evaluation.json`` (data, split, metrics) and ``records.safetensors``
        (and ``reference-records.safetensors`` when a metric compared).
    :param device: ``auto``, ``cpu``, ``cuda``, ... .
    :param progress: a :class:`~kdtoolkit.progress.Progress` (optional).
    :return: the content of ``evaluation.json``.
    :raises KdtError: for a bad split, bad data or a stage that is not trained.
    """
    from .evaluation import compute_metrics

    if split not in SPLITS:
        raise KdtError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", source="--split")
    spec = data_spec(stage, assignments)
    plugins = stage.run.plugins
    dataset = _split_dataset(spec, split, plugins)
    records = _records(stage, dataset, spec, split, device, progress)
    reference = None
    needs_reference = any(plugins.registry("metric").get(m["name"]).attr("requires_reference", False)
                          for m in stage.spec["metrics"])
    if needs_reference and stage.reference:
        reference = _records(stage.run.stage(stage.reference), dataset, spec, split, device, progress)
    result = {"stage": stage.name, "split": split, "data": spec, "reference": stage.reference if reference else "self",
              "test_images": records.n, **compute_metrics(stage.spec, records, reference, plugins)}
    out = Path(out) if out is not None else default_out(stage, spec, split)
    out.mkdir(parents=True, exist_ok=True)
    records.save(out / "records.safetensors")
    if reference is not None:
        reference.save(out / "reference-records.safetensors")
    atomic_write_json(out / "evaluation.json", result)
    result["out"] = str(out)
    return result
