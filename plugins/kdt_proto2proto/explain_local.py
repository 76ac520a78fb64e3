"""``kdt explain STAGE_DIR --image``: why a stage predicts what it predicts for one image.

ProtoPNet (as ProtoPNet's local analysis): the most activated prototypes,
each with where it fires on the image, its training patch, its similarity,
its last-layer weight to the predicted class and their product, its
contribution to that class's logit. ProtoTree (as ProtoTree's local
explanation): the greedy decision path from the root, each node with its
prototype, the similarity ``exp(−d)`` and the branch taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdt_prototypes import explain as X
from kdt_prototypes.receptive_field import rf_box
from kdt_prototypes.sheet import CYAN, GREEN, RED, YELLOW, boxed_tile, crop_tile, tile_scale
from kdtoolkit.foundation import atomic_write_json
from kdtoolkit.foundation import inside

from . import explain_figures as F
from .explain_stage import (
    LoadedStage,
    class_name,
    load_input,
    prototype_label,
    prototype_sources,
    prototype_views,
    recorded_prediction,
)

CAPTIONS = ["where it fires", "prototype's patch", "patch's source image"]


def _tiles(ld: LoadedStage, ex: dict, row: dict, view, present: bool = True) -> list[np.ndarray]:
    """Where the prototype fires on the input (receptive field cyan, high activation yellow), its patch, its source."""
    scale = tile_scale(ex["image"].shape[0])
    size = ex["image"].shape[0]
    boxes = []
    if present:
        info = ld.rf_info()
        if info is not None:
            h, w = row["location"]
            boxes.append((rf_box(size, h, w, info), CYAN))
        boxes.append((row["box"], YELLOW))
    first = boxed_tile(X.heat_overlay(ex["image"], row["up"]), scale, boxes)
    if view is None:
        blank = np.ones_like(first)
        return [first, blank, blank]
    src_boxes = ([(view.rf_box, CYAN)] if view.rf_box else []) + [(view.box, YELLOW)]
    return [first, crop_tile(view.image, view.box, first.shape[0]), boxed_tile(view.image, scale, src_boxes)]


def _prediction_lines(
    ld: LoadedStage, ex: dict, label: int | None, recorded: int | None, what: str
) -> list[tuple[str, Any, bool]]:
    pred = ex["prediction"]
    ok = None if label is None else pred == label
    lines = [
        (what, "black", True),
        (
            f"predicted '{class_name(ld.classes, pred)}' (p = {ex['probability']:.3f})",
            "black" if ok is None else (GREEN if ok else RED),
            True,
        ),
    ]
    if label is not None:
        lines.append((f"true class '{class_name(ld.classes, label)}'", "black", False))
    if recorded is not None:
        same = "the same" if recorded == pred else "DIFFERENT"
        lines.append(
            (
                f"evaluated prediction (records): '{class_name(ld.classes, recorded)}' ({same})",
                "dimgray" if recorded == pred else RED,
                False,
            )
        )
    return lines


def _protopnet_rows(ld: LoadedStage, ex: dict, views: dict) -> list[F.Row]:
    pred = class_name(ld.classes, ex["prediction"])
    rows = []
    for r, row in enumerate(ex["top"], 1):
        view = views.get(row["prototype"])
        lines: list[tuple[str, str | tuple, bool]] = [
            (f"#{r}  p{row['prototype']} · class '{class_name(ld.classes, row['class'])}'", "black", True),
            (f"similarity {row['similarity']:.3f}", "black", False),
            (f"× last-layer weight to '{pred}' {row['weight']:+.3f}", "black", False),
            (f"= contribution {row['contribution']:+.3f} to its logit", "black", False),
            (f"closest latent patch (h, w) = {tuple(row['location'])}", "dimgray", False),
        ]
        if view is not None and view.flags:
            lines.append((f"prototype flagged: {', '.join(view.flags)}", RED, False))
        rows.append(F.Row(_tiles(ld, ex, row, view), lines))
    return rows


def _tree_rows(ld: LoadedStage, ex: dict, path: dict, views: dict, sources: dict) -> list[F.Row]:
    act = ex["activation"]
    size = (ex["image"].shape[0], ex["image"].shape[1])
    grid_w = int(act.shape[-1])
    amin = ex["outputs"]["argmin"][0]
    rows = []
    for depth, node in enumerate(path["nodes"], 1):
        j = node["node"]
        loc = int(amin[j])
        row = {
            "location": (loc // grid_w, loc % grid_w),
            "box": X.activation_box(act[j], size),
            "up": X.upsample_map(act[j], size),
        }
        verdict: tuple[str, str | tuple]
        if node["forced"]:
            verdict = (f"pruned node: every input goes {'right' if node['right'] else 'left'}", "dimgray")
        elif node["right"]:
            verdict = ("s > 0.5 → right: prototype present", GREEN)
        else:
            verdict = ("s ≤ 0.5 → left: prototype absent", RED)
        lines: list[tuple[str, str | tuple, bool]] = [
            (f"depth {depth}: " + prototype_label(ld, sources[j]), "black", True),
            (f"d = {node['distance']:.3f}, similarity s = exp(−d) = {node['similarity']:.3f}", "black", False),
            (verdict[0], verdict[1], True),
        ]
        view = views.get(j)
        if view is not None and view.flags:
            lines.append((f"prototype flagged: {', '.join(view.flags)}", RED, False))
        rows.append(F.Row(_tiles(ld, ex, row, view, present=node["right"] and not node["forced"]), lines))
    return rows


def _tree_lines(ld: LoadedStage, path: dict) -> list[tuple[str, Any, bool]]:
    dist = path["distribution"]
    order = dist.argsort(descending=True)[:3].tolist()
    top = ", ".join(f"'{class_name(ld.classes, c)}' {float(dist[c]):.2f}" for c in order)
    return [
        (f"greedy path → leaf {path['leaf']}: {top}", "black", False),
        (
            f"greedy prediction '{class_name(ld.classes, order[0])}'; the evaluated prediction is the soft one above",
            "dimgray",
            False,
        ),
    ]


def explain_local(ld: LoadedStage, image: str, top: int, out_dir: Path) -> dict[str, Any]:
    """The local explanation of one image (a test index or an image file) as
    ``<test-IDX|image-STEM>.png`` and ``.json`` in ``out_dir``; returns the JSON's content.

    ProtoPNet: the ``top`` most activated prototypes; ProtoTree: the greedy path.
    The prediction is the argmax of the logits of the model's forward pass on the
    input, prepared as the stage's test split is; for a test index the
    evaluated prediction of the stage's records is shown beside it.
    """
    x, label, tag, what = load_input(ld, image)
    ex = X.explain_image(ld.model, x, top)
    recorded = recorded_prediction(ld, int(image)) if label is not None else None
    sources = {s.prototype: s for s in prototype_sources(ld)[0]}
    lines = _prediction_lines(ld, ex, label, recorded, what)
    info: dict[str, Any] = {
        "stage": ld.stage.name,
        "image": image,
        "label": label,
        "prediction": ex["prediction"],
        "class": class_name(ld.classes, ex["prediction"]),
        "probability": ex["probability"],
        "recorded_prediction": recorded,
    }
    if ld.is_tree:
        path = X.greedy_path(ld.model.head, ex["outputs"]["min_distances"][0])
        wanted = [n["node"] for n in path["nodes"]]
        lines += _tree_lines(ld, path)
        header = [
            "The greedy decision path: at each node, where the node's prototype fires on the image (heat map; "
            "cyan: receptive field of its closest patch, yellow: 95th-percentile activation box, drawn when "
            "present), the training patch it was projected onto and that patch's source image."
        ]
        info.update(path=path["nodes"], leaf=path["leaf"], greedy_prediction=int(path["distribution"].argmax()))
    else:
        wanted = [r["prototype"] for r in ex["top"]]
        logit = float(ex["outputs"]["logits"][0, ex["prediction"]])
        total = sum(r["contribution"] for r in ex["top"])
        lines.append((f"logit {logit:.3f}; the top {len(wanted)} prototypes contribute {total:.3f}", "black", False))
        header = [
            f"The {len(wanted)} most activated prototypes: where each fires on the image (heat map; cyan: "
            "receptive field of its closest patch, yellow: 95th-percentile activation box), the training patch "
            "it was projected onto and that patch's source image; contribution = similarity × last-layer weight."
        ]
        info["top"] = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items() if k != "up"} for r in ex["top"]
        ]
    views = {v.source.prototype: v for v in prototype_views(ld, [sources[j] for j in wanted])}
    rows = _tree_rows(ld, ex, path, views, sources) if ld.is_tree else _protopnet_rows(ld, ex, views)
    fig = inside(out_dir, f"{tag}.png", what="output folder")
    size = F.rows_figure(f"{ld.stage.name}: {what}", header, ex["image"], lines, CAPTIONS, rows, fig)
    info.update(figure=str(fig), size=list(size))
    atomic_write_json(fig.with_suffix(".json"), info)
    return info
