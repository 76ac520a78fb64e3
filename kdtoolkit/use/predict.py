"""Use a trained stage on new images: ``kdt predict``.

Images are preprocessed exactly as the stage's test split is: the stage's
dataset (built from its resolved recipe) must provide ``preprocess(image)``,
the un-augmented evaluation transform of one RGB PIL image to a ``[3, S, S]``
tensor. The built-in datasets do. A head that provides
``top_prototypes(outputs, k)`` (ProtoPNet, ProtoTree) adds each image's
most activated prototypes to the prediction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch

from kdtoolkit.foundation.errors import DataError, KdtError
from kdtoolkit.use.rundir import StageDir

#: File suffixes read as images when a folder is given (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched
    recursively for :data:`IMAGE_SUFFIXES` (sorted; hidden entries skipped).

    Nothing is opened here: a special file (a FIFO, a device, a socket, a link
    to one) given, or found in a folder with an image suffix, is refused by name.

    :raises DataError: for a path that does not exist, is not a regular file,
        or a folder without images.
    """
    from kdtoolkit.foundation.limits import special_file_kind

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            named = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES
                and not f.is_dir()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            for f in named:
                if not f.is_file():
                    raise DataError(f"not a regular file ({special_file_kind(f)})", source=str(f))
            if not named:
                raise DataError(f"folder has no images ({', '.join(IMAGE_SUFFIXES)})", source=str(p))
            out.extend(named)
        elif os.path.lexists(p):  # a FIFO, a device, a socket, a link to one or a broken link
            raise DataError(f"not a regular file ({special_file_kind(p)})", source=str(p))
        else:
            raise DataError("no such file or folder", source=str(p))
    if not out:
        raise DataError("no images given", source="kdt predict")
    return out


def load_image(path: Path):
    """``path`` decoded by Pillow as an RGB image (:func:`kdtoolkit.foundation.images.open_image`: regular files
    only, the pixel limit checked from the header before decoding).

    :raises DataError: naming the file when it is not a regular file, is over the pixel limit, or
        Pillow cannot read it.
    """
    from kdtoolkit.foundation.images import open_image

    return open_image(path).convert("RGB")


def stage_test_split(stage: StageDir, assignments: tuple[str, ...] | list[str] = ()) -> Any:
    """The stage's un-augmented test dataset (the evaluation preprocessing and the class names).

    :param assignments: ``KEY=VALUE`` changes to the stage's ``data`` table
        (e.g. ``root=...`` where the data lies elsewhere on this machine), as
        ``kdt evaluate --data`` takes them.
    """
    from kdtoolkit.engine.data import dataset_split
    from kdtoolkit.use.evaluate import data_spec

    spec = data_spec(stage, assignments) if assignments else dict(stage.spec["data"])
    return dataset_split(spec, "test", stage.run.plugins)


def _class_name(classes: list[str] | None, i: int) -> str:
    return classes[i] if classes and 0 <= i < len(classes) else str(i)


def _rows(
    paths: list[Path],
    outputs: dict[str, torch.Tensor],
    top: dict[str, torch.Tensor] | None,
    classes: list[str] | None,
    grid_w: int | None,
) -> list[dict[str, Any]]:
    probs = torch.softmax(outputs["logits"].float(), dim=1)
    conf, pred = probs.max(dim=1)
    rows = []
    for b, path in enumerate(paths):
        row: dict[str, Any] = {
            "image": str(path),
            "prediction": int(pred[b]),
            "class": _class_name(classes, int(pred[b])),
            "probability": float(conf[b]),
        }
        if top is not None:
            row["top_prototypes"] = [
                _prototype_entry(top, b, j, classes, grid_w) for j in range(top["prototype"].shape[1])
            ]
        rows.append(row)
    return rows


def _prototype_entry(
    top: dict[str, torch.Tensor], b: int, j: int, classes: list[str] | None, grid_w: int | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"prototype": int(top["prototype"][b, j]), "similarity": float(top["similarity"][b, j])}
    if "class" in top:
        entry["class"] = _class_name(classes, int(top["class"][b, j]))
    if "contribution" in top:
        entry["contribution"] = float(top["contribution"][b, j])
    if "location" in top and grid_w:
        loc = int(top["location"][b, j])
        entry["location"] = [loc // grid_w, loc % grid_w]
    return entry


@torch.inference_mode()
def predict(
    stage: StageDir,
    inputs: Iterable[str | Path],
    *,
    top: int = 3,
    batch_size: int = 32,
    device: str = "auto",
    progress=None,
    data: tuple[str, ...] | list[str] = (),
) -> list[dict[str, Any]]:
    """Predict the class of every image in ``inputs`` with the trained ``stage``.

    :param stage: a finished stage (its ``model.safetensors`` is loaded strictly).
    :param inputs: image files and folders (see :func:`image_paths`).
    :param top: prototypes listed per image, when the head provides ``top_prototypes``.
    :param batch_size: images per forward pass.
    :param device: ``auto``, ``cpu``, ``cuda``, ... .
    :param progress: a :class:`~kdtoolkit.foundation.progress.Progress` (optional).
    :param data: ``KEY=VALUE`` changes to the stage's data table (see :func:`stage_test_split`).
    :return: one dict per image: ``image``, ``prediction`` (class index),
        ``class`` (its name), ``probability`` (softmax of the logits) and,
        for prototype heads, ``top_prototypes`` (``prototype``,
        ``similarity``, ``contribution`` and ``class`` where the head has
        them, ``location`` ``[h, w]`` on the latent grid).
    :raises KdtError: when the stage's dataset cannot preprocess a single image.
    """
    from kdtoolkit.foundation.device import resolve_device

    paths = image_paths(inputs)
    test = stage_test_split(stage, data)
    preprocess = getattr(test, "preprocess", None)
    if preprocess is None:
        raise KdtError(
            f"dataset '{stage.spec['data']['dataset']}' has no preprocess(image) method, so single images "
            "cannot be prepared as its test split is",
            source=str(stage.path),
        )
    dev = resolve_device(device)
    model = stage.model(str(dev))
    top_fn = getattr(model.head, "top_prototypes", None) if top > 0 else None
    classes = stage.classes() or list(getattr(test, "classes", []) or []) or None
    rows: list[dict[str, Any]] = []
    task = progress.add("predict", total=-(-len(paths) // batch_size)) if progress else None
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        x = torch.stack([preprocess(load_image(p)) for p in chunk]).to(dev)
        out = model(x)
        picked = top_fn(out, top) if top_fn is not None else None
        grid_w = int(out["features"].shape[-1]) if "features" in out and out["features"].dim() == 4 else None
        rows.extend(
            _rows(
                chunk,
                {k: v.cpu() for k, v in out.items() if k == "logits"},
                {k: v.cpu() for k, v in picked.items()} if picked else None,
                classes,
                grid_w,
            )
        )
        if progress:
            progress.advance(task)
    return rows
