"""A stage of a run, loaded for ``kdt explain``: its model, datasets, prototype sources and inputs.

The model is the stage's ``model.safetensors`` loaded strictly, in eval
mode; test images come from the stage's un-augmented test split, and an image
file is prepared by the dataset's ``preprocess`` (as ``kdt predict`` does):
the same model state and preprocessing as the stage's evaluation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdt_prototypes import explain as X
from kdt_prototypes.receptive_field import RFInfo, model_rf_info
from kdtoolkit.use import StageDir
from kdtoolkit.foundation import KdtError
from kdtoolkit.foundation import inside


@dataclass
class LoadedStage:
    """A stage ready to explain: its model (eval mode, on ``device``) and datasets (:class:`StageData`)."""

    stage: StageDir
    model: Any
    data: Any
    device: torch.device

    @property
    def classes(self) -> list[str]:
        """The class names of the stage's dataset."""
        return list(getattr(self.data.test, "classes", []) or [])

    def rf_info(self) -> RFInfo | None:
        """The prototype layer's receptive field (:func:`~kdt_prototypes.receptive_field.model_rf_info`)
        for the stage's image size; ``None`` when the backbone's layers cannot be listed."""
        if not hasattr(self, "_rf"):
            size = int(self.data.test[0][0].shape[-1])
            try:
                self._rf: RFInfo | None = model_rf_info(self.model, size)
            except Exception:  # e.g. a backbone that is not a stack of 2-D convolutions and poolings
                self._rf = None
        return self._rf

    @property
    def is_tree(self) -> bool:
        """Whether the head is a ProtoTree."""
        return X.is_tree(self.model.head)


def load_stage(stage: StageDir, device: str = "auto") -> LoadedStage:
    """The stage's trained model and datasets.

    :raises KdtError: when the stage's head is not a prototype head with a ``distances`` output.
    """
    from kdtoolkit.foundation import resolve_device

    dev = resolve_device(device)
    data = stage.data()
    model = stage.model(str(dev), data)
    head = model.head
    if not hasattr(head, "prototypes") or "distances" not in getattr(head, "outputs", ()):
        raise KdtError(
            f"the head {type(head).__name__} is not a prototype head (ProtoPNet or ProtoTree): nothing to explain",
            source=str(stage.path),
        )
    return LoadedStage(stage, model, data, dev)


def _projection_record(stage: StageDir) -> tuple[dict | None, str | None]:
    pushes = [(h["kind"], h["name"]) for h in stage.result.get("history", []) if h.get("kind") in ("push", "project")]
    if not pushes:
        return None, None
    name = f"{pushes[-1][0]}-{pushes[-1][1]}.json"
    path = stage.file(name)
    try:
        return json.loads(path.read_text(encoding="utf-8")), name
    except (OSError, ValueError, RecursionError):
        raise KdtError("unreadable projection record", source=str(path)) from None


def prototype_sources(ld: LoadedStage) -> tuple[list[X.PrototypeSource], str]:
    """Where each prototype comes from, and a sentence saying how that was found.

    The record of the stage's last push (``push-<phase>.json``) or projection
    (``project-<phase>.json``) when the evaluated prototypes are those
    training patches (stage state ``pushed``); otherwise (no push, or
    prototypes trained after it) each prototype's nearest training patch,
    searched as a push would.
    """
    record, name = _projection_record(ld.stage)
    if record is not None and ld.stage.result.get("state", {}).get("pushed"):
        return X.sources_from_record(record), f"projected training patches from {name}"
    batch = int(ld.data.spec.get("eval_batch_size", 64))
    sources = X.nearest_patches(ld.model, ld.data.train_eval, batch, ld.device)
    why = "trained after their last push" if record is not None else "never pushed"
    return sources, f"the prototypes were {why}: each one's nearest training patch of an allowed class is shown"


def prototype_views(ld: LoadedStage, sources: list[X.PrototypeSource]) -> list[X.PrototypeView]:
    """:func:`kdt_prototypes.explain.explain_prototypes` for the stage, with its receptive field."""
    return X.explain_prototypes(ld.model, ld.data.train_eval, sources, ld.rf_info(), ld.device)


def class_name(classes: list[str], i: int | None) -> str:
    """The name of class ``i`` (its index when unnamed)."""
    if i is None:
        return "?"
    return classes[i] if 0 <= i < len(classes) else str(i)


def prototype_label(ld: LoadedStage, src: X.PrototypeSource) -> str:
    """``p12 · class '3'`` (ProtoPNet) or ``node 5 · classes '1', '7'`` (ProtoTree)."""
    names = ", ".join(f"'{class_name(ld.classes, c)}'" for c in src.classes)
    if ld.is_tree:
        return f"node {src.prototype}" + (f" · classes {names}" if names else "") + ("" if src.kept else " (pruned)")
    return f"p{src.prototype} · class {names or '?'}"


def out_dir_for(out: Path | None, default: Path) -> Path:
    """``out``, or ``default/explanations`` when it is ``None`` (checked to lie inside ``default``, the run
    or stage directory: :func:`kdtoolkit.foundation.paths.inside`)."""
    return Path(out) if out is not None else inside(default, "explanations", what="run directory")


def view_json(v: X.PrototypeView) -> dict[str, Any]:
    """A prototype view's numbers as JSON values: source, boxes, patch statistics and flags."""
    s = v.source
    return {
        "prototype": s.prototype,
        "classes": s.classes,
        "kept": s.kept,
        "image": s.image,
        "h": s.h,
        "w": s.w,
        "box": list(v.box),
        "rf_box": list(v.rf_box) if v.rf_box else None,
        **{k: v.stats[k] for k in ("patch_std", "background_fraction", "flat_fraction", "flags")},
    }


def load_input(ld: LoadedStage, image: str) -> tuple[torch.Tensor, int | None, str, str]:
    """The model input named by ``image``: an image file, or an index into the stage's test split.

    :return: ``(x [3, S, S], true label or None, file-name tag, description)``,
        e.g. ``(x, 3, "test-17", "test image 17")``.
    :raises KdtError: for an index out of range, a path that is neither, or a
        dataset without ``preprocess``.
    """
    from kdtoolkit.use import load_image

    path = Path(image)
    if path.is_file():
        preprocess = getattr(ld.data.test, "preprocess", None)
        if preprocess is None:
            raise KdtError(
                f"dataset '{ld.data.spec['dataset']}' has no preprocess(image) method, so an image file "
                "cannot be prepared as its test split is",
                source=str(ld.stage.path),
            )
        return preprocess(load_image(path)), None, f"image-{path.stem}", f"image {path.name}"
    if image.strip().isdigit():
        idx, n = int(image), len(ld.data.test)
        if idx >= n:
            raise KdtError(f"test index {idx} is out of range (the test split has {n} images)", source="--image")
        x, label = ld.data.test[idx]
        return x, int(label), f"test-{idx}", f"test image {idx}"
    if os.path.lexists(path):  # a FIFO, a device, a socket, a link to one: never opened
        from kdtoolkit.foundation import special_file_kind

        raise KdtError(f"not a regular file ({special_file_kind(path)})", source=str(image))
    raise KdtError("neither an image file nor a test index", source=str(image))


def recorded_prediction(ld: LoadedStage, index: int) -> int | None:
    """The evaluated prediction (argmax of the logits in ``records.safetensors``) of test image
    ``index``, or ``None`` when the stage has no records."""
    from kdtoolkit.results import Records

    path = ld.stage.file("records.safetensors")
    if not path.is_file():
        return None
    return int(Records.load(path)["logits"][index].argmax())
