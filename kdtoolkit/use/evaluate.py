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

from kdtoolkit.foundation.errors import DataError, KdtError, RecipeError
from kdtoolkit.foundation.io import atomic_write_json, is_resource_error
from kdtoolkit.foundation.paths import inside
from kdtoolkit.plugin.declared import record_keys
from kdtoolkit.results.records import Records
from kdtoolkit.use.rundir import StageDir

#: Splits ``kdt evaluate`` can read.
SPLITS = ("test", "train")


def data_spec(stage: StageDir, assignments: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The stage's ``data`` table with ``KEY=VALUE`` assignments applied, validated.

    :raises RecipeError: (source ``--data``) for a malformed assignment, an
        unknown key or a bad value.
    """
    from kdtoolkit.recipe.loader import parse_override_value
    from kdtoolkit.recipe.validator import DATA_KEYS, Validator

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


def default_out(stage: StageDir, spec: dict[str, Any], split: str) -> Path:
    """``<stage>/evaluations/<dataset>-<split>-<8 hex digits of the data table>``, checked to lie inside
    the stage directory (:func:`kdtoolkit.foundation.paths.inside`)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return inside(stage.path, "evaluations", f"{spec['dataset']}-{split}-{digest}", what="stage directory")


def run_precision(stage: StageDir, device) -> str:
    """The run's ``precision`` (as its own evaluation used), or ``fp32`` for ``fp16`` on a CPU, which has none."""
    precision = str(stage.run.recipe.get("precision", "fp32"))
    return "fp32" if precision == "fp16" and device.type == "cpu" else precision


def _records(stage: StageDir, dataset: Any, spec: dict[str, Any], split: str, device: str, progress) -> Records:
    from kdtoolkit.foundation.device import resolve_device
    from kdtoolkit.engine.evaluation import evaluate

    expected = stage.num_classes()
    if int(dataset.num_classes) != expected:
        raise DataError(
            f"the data has {dataset.num_classes} classes, stage '{stage.name}' was trained on {expected}",
            source="--data",
            key="dataset",
        )
    trained, given = stage.classes(), [str(c) for c in getattr(dataset, "classes", [])]
    if trained and given and given != trained:
        first = next(i for i, (a, b) in enumerate(zip(given, trained)) if a != b)
        raise DataError(
            f"the data's classes differ from those stage '{stage.name}' was trained on (label {first}: "
            f"{given[first]!r} here, {trained[first]!r} in training); labels would not mean the same class",
            source="--data",
            key="dataset",
        )
    dev = resolve_device(device)
    model = stage.model(str(dev))
    head = stage.run.plugins.registry("head").get(stage.spec["model"]["head"]["name"])
    return evaluate(
        model,
        dataset,
        batch_size=spec["eval_batch_size"],
        device=dev,
        record_keys=record_keys(head),
        progress=progress,
        num_workers=spec["num_workers"],
        precision=run_precision(stage, dev),
        meta={
            "stage": stage.name,
            "dataset": getattr(dataset, "name", spec["dataset"]),
            "split": split,
            "num_classes": int(dataset.num_classes),
        },
    )


#: Files whose presence marks a folder that ``kdt evaluate`` must not write into (a run or a stage).
RUN_FILES = (
    "model.safetensors",
    "result.json",
    "recipe.resolved.json",
    "records.safetensors",
    "checkpoint.safetensors",
)


def check_out(out: Path) -> None:
    """Refuse an output folder that is a run or stage directory (its files would be overwritten)."""
    taken = [f for f in RUN_FILES if (out / f).exists()]
    if taken:
        raise KdtError(
            f"folder holds {taken[0]}: it is a run or stage directory, whose files would be overwritten; "
            "choose another --out",
            source=str(out),
        )


def _write(out: Path, records: Records, reference: Records | None, result: dict[str, Any]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        records.save(out / "records.safetensors")
        if reference is not None:
            reference.save(out / "reference-records.safetensors")
        atomic_write_json(out / "evaluation.json", result)
    except OSError as exc:
        if is_resource_error(exc):  # a full disk: the command line's one line for resource errors
            raise
        raise KdtError(f"cannot write the evaluation: {exc.strerror or exc}", source=str(out)) from None


def evaluate_stage(
    stage: StageDir,
    assignments: tuple[str, ...] | list[str] = (),
    *,
    split: str = "test",
    out: Path | None = None,
    device: str = "auto",
    progress=None,
) -> dict[str, Any]:
    """Evaluate ``stage`` on ``split`` of its (changed) data and write the results.

    :param stage: a finished stage.
    :param assignments: ``KEY=VALUE`` changes to the stage's ``data`` table.
    :param split: ``test`` or ``train`` (un-augmented).
    :param out: output folder (default :func:`default_out`); it receives
        ``evaluation.json`` (data, split, metrics) and ``records.safetensors``
        (and ``reference-records.safetensors`` when a metric compared).
    :param device: ``auto``, ``cpu``, ``cuda``, ... .
    :param progress: a :class:`~kdtoolkit.foundation.progress.Progress` (optional).
    :return: the content of ``evaluation.json``.
    :raises KdtError: for a bad split, bad data or a stage that is not trained.
    """
    from kdtoolkit.engine.data import dataset_split
    from kdtoolkit.engine.evaluation import compute_metrics

    if split not in SPLITS:
        raise KdtError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", source="--split")
    spec = data_spec(stage, assignments)
    if out is not None:
        check_out(Path(out))
    plugins = stage.run.plugins
    dataset = dataset_split(spec, split, plugins)
    records = _records(stage, dataset, spec, split, device, progress)
    reference = None
    needs_reference = any(
        plugins.registry("metric").get(m["name"]).attr("requires_reference", False) for m in stage.spec["metrics"]
    )
    if needs_reference and stage.reference:
        reference = _records(stage.run.stage(stage.reference), dataset, spec, split, device, progress)
    from kdtoolkit.foundation.device import resolve_device

    result = {
        "stage": stage.name,
        "split": split,
        "data": spec,
        "precision": run_precision(stage, resolve_device(device)),
        "reference": stage.reference if reference else "self",
        "test_images": records.n,
        **compute_metrics(stage.spec, records, reference, plugins),
    }
    out = Path(out) if out is not None else default_out(stage, spec, split)
    _write(out, records, reference, result)
    result["out"] = str(out)
    return result
