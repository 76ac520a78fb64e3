"""What ``kdt explain`` does: figures explaining prototype models, each with a JSON of its numbers.

- global (:func:`explain_global`): a gallery of a stage's prototypes on the
  training patches they were projected onto, uninformative ones flagged;
- local (:func:`explain_local`): one image's prediction, its most activated
  prototypes (ProtoPNet) or its greedy decision path (ProtoTree);
- comparison (:func:`explain_compare`): several stages side by side on one image;
- matched pairs (:func:`explain_pairs`): the PMS matching's best and worst
  teacher/student prototype pairs.

The model is the stage's ``model.safetensors`` loaded strictly, in eval
mode, and test images are the stage's un-augmented test split (an image file
is prepared by the dataset's ``preprocess``, as ``kdt predict`` does): the
same model state and preprocessing as the stage's evaluation. The drawing is
in :mod:`kdt_proto2proto.explain_figures`, the maps and boxes in
:mod:`kdt_prototypes.explain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from kdt_prototypes import explain as X
from kdt_prototypes.sheet import GREEN, RED, YELLOW, boxed_tile, crop_tile, fit, tile_scale
from kdtoolkit.use import RunDir, StageDir
from kdtoolkit.foundation import KdtError
from kdtoolkit.foundation import atomic_write_json
from kdtoolkit.foundation import inside

from . import explain_figures as F
from .explain_local import explain_local
from .explain_pairs import explain_pairs
from .explain_stage import (
    LoadedStage,
    class_name,
    load_input,
    load_stage,
    out_dir_for,
    prototype_label,
    prototype_sources,
    prototype_views,
    view_json,
)

__all__ = ["explain_global", "explain_local", "explain_compare", "explain_pairs", "run_explain"]

#: Prototypes per page of the global gallery.
PAGE = 40


def explain_global(ld: LoadedStage, out_dir: Path, per_page: int = PAGE) -> dict[str, Any]:
    """The gallery of every prototype (``prototypes.png``, or ``prototypes-<page>.png`` beyond
    ``per_page``) and ``prototypes.json``; returns the JSON's content."""
    sources, note = prototype_sources(ld)
    views = prototype_views(ld, sources)
    if not views:
        raise KdtError("no prototype has a source patch to show", source=str(ld.stage.path))
    flagged = [v for v in views if v.flags]
    what = "node " if ld.is_tree else "p"
    listing = ", ".join(f"{what}{v.source.prototype} ({', '.join(v.flags)})" for v in flagged)
    footer = [f"flagged ({len(flagged)} of {len(views)}): {listing}" if flagged else "no prototype flagged"]
    legend = [
        f"Source: {note}. Each prototype: its training patch (the high-activation box, zoomed) · the source "
        "image with the receptive field of its latent location (cyan) and the high-activation box (yellow: "
        "pixels at or above the 95th percentile of the bicubically upsampled activation) · the activation "
        "heat map. Flagged (red): constant patch (pixel std < 0.05), background (≥ 80% of the box within 0.1 "
        "of the image's border colour) or flat activation (> half the latent locations within 5% of the peak)."
    ]
    pages = [views[i : i + per_page] for i in range(0, len(views), per_page)]
    figures = []
    for n, page in enumerate(pages, 1):
        path = out_dir / ("prototypes.png" if len(pages) == 1 else f"prototypes-{n}.png")
        labels = [
            (prototype_label(ld, v.source), f"image {v.source.image}, (h, w) = ({v.source.h}, {v.source.w})")
            for v in page
        ]
        title = f"{ld.stage.name}: prototypes" + (f" (page {n} of {len(pages)})" if len(pages) > 1 else "")
        size = F.gallery_figure(page, labels, title, legend, footer, path)
        figures.append({"path": str(path), "size": list(size)})
    info = {
        "stage": ld.stage.name,
        "source": note,
        "figures": figures,
        "flagged": [v.source.prototype for v in flagged],
        "prototypes": [view_json(v) for v in views],
    }
    atomic_write_json(out_dir / "prototypes.json", info)
    return info


def _stage_column(ld: LoadedStage, x: torch.Tensor, label: int | None, top: int, side: int) -> tuple[F.Column, dict]:
    """One model's column of the comparison (tiles ``side`` pixels a side) and its numbers."""
    ex = X.explain_image(ld.model, x, top)
    sources = {s.prototype: s for s in prototype_sources(ld)[0]}
    views = {v.source.prototype: v for v in prototype_views(ld, [sources[r["prototype"]] for r in ex["top"]])}
    scale = tile_scale(ex["image"].shape[0])
    pred = ex["prediction"]
    ok = None if label is None else pred == label
    header = [
        (ld.stage.name, "black", True),
        (
            f"predicted '{class_name(ld.classes, pred)}' (p = {ex['probability']:.2f})",
            "black" if ok is None else (GREEN if ok else RED),
            True,
        ),
    ]
    entries, rows = [], []
    for r, row in enumerate(ex["top"], 1):
        j = row["prototype"]
        view = views.get(j)
        detail = f"similarity {row['similarity']:.2f}" + (
            f" · contribution {row['contribution']:+.2f}" if "contribution" in row else ""
        )
        first = fit(boxed_tile(X.heat_overlay(ex["image"], row["up"]), scale, [(row["box"], YELLOW)]), side)
        tiles = [first, crop_tile(view.image, view.box, side) if view is not None else np.ones_like(first)]
        entries.append((f"#{r} " + prototype_label(ld, sources[j]), detail, tiles))
        rows.append({k: v for k, v in row.items() if k not in ("up",)})
    return F.Column(header, entries), {"prediction": pred, "probability": ex["probability"], "top": rows}


def explain_compare(
    run: RunDir, names: list[str], image: str, top: int, out_dir: Path, device: str = "auto"
) -> dict[str, Any]:
    """Several stages side by side on one test image (or image file): each one's prediction and
    ``top`` most activated prototypes, where they fire and the training patch of each."""
    if not names:
        raise KdtError("--compare names no stage", source=str(run.path))
    columns, models, first = [], {}, None
    for name in names:
        ld = load_stage(run.stage(name), device)
        x, label, tag, what = load_input(ld, image)
        first = first or (x, label, tag, what, ld)
        if label != first[1]:
            raise KdtError(
                f"stage '{name}' labels {what} '{label}', stage '{names[0]}' '{first[1]}': not the same test set",
                source=str(run.path),
            )
        side = first[0].shape[-1] * tile_scale(first[0].shape[-1])
        col, info = _stage_column(ld, x, label, top, side)
        columns.append(col)
        models[name] = info
    assert first is not None  # names is not empty
    x, label, tag, what, ld0 = first
    lines = [what] + ([f"true class '{class_name(ld0.classes, label)}'"] if label is not None else [])
    legend = [
        "For each model, its most activated prototypes on this image: where each fires (heat map; yellow box: "
        "pixels at or above the 95th percentile of the upsampled activation) and the training patch it was "
        "projected onto."
        + ("" if ld0.is_tree else " Contribution: similarity × last-layer weight to the predicted class.")
    ]
    path = inside(out_dir, f"compare-{tag}.png", what="output folder")
    size = F.compare_figure(f"{' vs '.join(names)}: {what}", legend, X.display_image(x), lines, columns, path)
    info = {"image": image, "label": label, "models": models, "figure": str(path), "size": list(size)}
    atomic_write_json(path.with_suffix(".json"), info)
    return info


def run_explain(
    path: Path,
    *,
    global_: bool,
    image: str | None,
    compare: str | None,
    pairs: str | None,
    top: int | None,
    out: Path | None,
    device: str,
    data: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``kdt explain`` with its options (see :mod:`kdt_proto2proto.command`); prints what it wrote.
    ``data``: ``KEY=VALUE`` changes to the stages' data tables (``--data``, e.g. ``root=...``)."""
    from kdtoolkit.foundation import check_device_spec

    check_device_spec(device, "--device")
    modes = [m for m, on in (("--global", global_), ("--compare", compare), ("--pairs", pairs)) if on]
    if len(modes) > 1:
        raise KdtError(
            f"give one of --global, --image, --compare, --pairs (got {', '.join(modes)})", source="kdt explain"
        )
    if top is not None and top < 1:
        raise KdtError(f"--top must be at least 1, got {top}", source="kdt explain")
    if compare:
        if image is None:
            raise KdtError("--compare needs --image (a test index or an image file)", source="kdt explain")
        names = [n.strip() for n in compare.split(",") if n.strip()]
        if not names:
            raise KdtError(
                f"--compare names no stage (got {compare!r}); e.g. --compare teacher,kd", source="kdt explain"
            )
        run = RunDir(path, data=data)
        info = explain_compare(run, names, image, top or 3, out_dir_for(out, run.path), device)
    elif pairs:
        run = RunDir(path, data=data)
        info = explain_pairs(run, pairs, top or 5, out_dir_for(out, run.path), device)
    elif global_ or image is not None:
        if global_ and image is not None:
            raise KdtError("give one of --global, --image (not both)", source="kdt explain")
        if (Path(path) / "recipe.resolved.json").is_file() or (Path(path) / "recipe.resolved.toml").is_file():
            raise KdtError(
                "a run directory: --global and --image explain one stage, give its directory "
                f"(e.g. {Path(path) / 'kd'})",
                source=str(path),
            )
        ld = load_stage(StageDir.open(path, data=data), device)
        out_dir = out_dir_for(out, ld.stage.path)
        # without --global, --image is given (checked above)
        info = explain_global(ld, out_dir) if global_ else explain_local(ld, cast(str, image), top or 5, out_dir)
    else:
        raise KdtError("say what to explain: --global, --image, --compare or --pairs", source="kdt explain")
    for fig in info.get("figures", [info]):
        print(f"explanation: {fig.get('figure') or fig.get('path')}")
    if "flagged" in info:
        flagged = info["flagged"]
        print(f"flagged prototypes: {', '.join(map(str, flagged))}" if flagged else "flagged prototypes: none")
    return info
