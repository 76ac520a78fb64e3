"""Explanations of prototype models: where each prototype comes from and where it fires.

The conventions are ProtoPNet's (method notes §1, "Explanation"): a
prototype's activation over the latent grid (the head's similarity of every
patch to it: ProtoPNet's log or linear similarity of the squared-L2 distance,
ProtoTree's ``exp(−d)``) is upsampled bicubically to the image size; its
*high-activation box* encloses the pixels at or above the 95th percentile;
the *receptive-field box* is the field of the prototype's latent location
(:mod:`kdt_prototypes.receptive_field`); the heat map is the min–max
normalised upsampled activation in the ``jet`` colours, laid over the image
as ``0.5·image + 0.5·heat`` (ProtoPNet: 0.3). Works with any head of the prototype-head
protocol whose forward pass returns ``distances`` (ProtoPNet and ProtoTree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as TF

from .figures import activation_box
from .receptive_field import RFInfo, rf_box

__all__ = [
    "MIN_PATCH_STD",
    "MAX_BACKGROUND_FRACTION",
    "MAX_FLAT_FRACTION",
    "is_tree",
    "similarity_maps",
    "upsample_map",
    "display_image",
    "heat_overlay",
    "patch_flags",
    "PrototypeSource",
    "sources_from_record",
    "allowed_classes",
    "nearest_patches",
    "PrototypeView",
    "explain_prototypes",
    "explain_image",
    "greedy_path",
]

#: Defaults of :func:`patch_flags`.
MIN_PATCH_STD = 0.05
MAX_BACKGROUND_FRACTION = 0.8
MAX_FLAT_FRACTION = 0.5


def is_tree(head) -> bool:
    """Whether ``head`` is a ProtoTree head (decision nodes, leaves), not a ProtoPNet one."""
    return hasattr(head, "leaves") and hasattr(head, "depth")


def similarity_maps(head, distances: torch.Tensor) -> torch.Tensor:
    """The activation maps ``[B, P, H, W]`` of the head's ``distances`` output.

    ProtoPNet: its similarity (``log((d+1)/(d+1e-4))`` or ``−d``); ProtoTree: ``exp(−d)``.
    """
    if is_tree(head):
        return torch.exp(-distances.float())
    from .functional import distance_to_similarity

    return distance_to_similarity(distances.float(), getattr(head, "similarity", "log"))


def upsample_map(act: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An ``[H, W]`` activation map upsampled bicubically to ``size`` (float32 numpy)."""
    up = TF.interpolate(act[None, None].float().cpu(), size=size, mode="bicubic", align_corners=False)[0, 0]
    return up.numpy()


def display_image(img: torch.Tensor) -> np.ndarray:
    """A ``[3, S, S]`` model input rescaled to ``[0, 1]`` (min–max) as an ``[S, S, 3]`` array."""
    img = img.detach().float().cpu()
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo + 1e-8)).clamp(0, 1).permute(1, 2, 0).numpy()


def heat_overlay(image: np.ndarray, up: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """``0.5·image + weight·jet(normalised up)``, clipped to ``[0, 1]`` (ProtoPNet overlays with weight 0.3;
    0.5 keeps the colours readable on dark images such as the digits)."""
    from matplotlib import colormaps

    span = float(up.max() - up.min())
    norm = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    heat = colormaps["jet"](norm)[..., :3]
    return np.clip(0.5 * image + weight * heat, 0, 1)


def patch_flags(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    act: np.ndarray,
    *,
    min_std: float = MIN_PATCH_STD,
    max_background: float = MAX_BACKGROUND_FRACTION,
    max_flat: float = MAX_FLAT_FRACTION,
) -> dict[str, Any]:
    """Whether a prototype's source patch is uninformative, with the numbers behind it.

    - ``constant patch``: the standard deviation of the display pixels
      (:func:`display_image`, ``[0, 1]``) inside the high-activation ``box``
      is below ``min_std``;
    - ``background``: at least ``max_background`` of the box's pixels lie
      within 0.1 (every channel) of the background colour, the median of the
      image's outer one-pixel frame (on the digits, the black border);
    - ``flat activation``: more than ``max_flat`` of the latent locations are
      within 5% of the activation range from its maximum (the prototype
      matches a whole region equally, as on a constant background), or the
      map is constant.

    :param image: the source image ``[S, S, 3]`` in ``[0, 1]``.
    :param box: ``(top, left, bottom, right)``, inclusive.
    :param act: the activation map over the latent grid ``[H, W]``.
    :return: ``{"patch_std", "background_fraction", "flat_fraction", "flags"}``.
    """
    top, left, bottom, right = box
    patch = image[top : bottom + 1, left : right + 1]
    frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(frame, axis=0)
    near = (np.abs(patch - background) <= 0.1).all(axis=-1)
    act = np.asarray(act, dtype=np.float64)
    span = float(act.max() - act.min())
    flat = 1.0 if span <= 1e-9 else float((act >= act.max() - 0.05 * span).mean())
    stats = {"patch_std": float(patch.std()), "background_fraction": float(near.mean()), "flat_fraction": flat}
    flags = []
    if stats["patch_std"] < min_std:
        flags.append("constant patch")
    if stats["background_fraction"] >= max_background:
        flags.append("background")
    if flat > max_flat:
        flags.append("flat activation")
    return {**stats, "flags": flags}


@dataclass
class PrototypeSource:
    """Where a prototype was projected: training image ``image`` (index in the
    un-augmented training split), latent location ``(h, w)``.

    :ivar classes: the prototype's class (ProtoPNet) or the classes its
        projection allowed (ProtoTree node); empty when unknown.
    :ivar kept: false for a pruned tree node.
    """

    prototype: int
    image: int
    h: int
    w: int
    found: bool = True
    classes: list[int] = field(default_factory=list)
    kept: bool = True


def sources_from_record(record: dict[str, Any]) -> list[PrototypeSource]:
    """The sources in a ``push-<phase>.json`` or ``project-<phase>.json`` record."""
    out = []
    for p in record["prototypes"]:
        classes = p["classes"] if "classes" in p else ([] if p.get("class") is None else [p["class"]])
        out.append(
            PrototypeSource(
                int(p["prototype"]),
                int(p["image"]),
                int(p["h"]),
                int(p["w"]),
                bool(p["found"]),
                [int(c) for c in classes],
                bool(p.get("node_kept", True)),
            )
        )
    return out


def allowed_classes(head) -> torch.Tensor:
    """``[P, K]`` bool: the classes a prototype may be projected onto (ProtoPNet: its own; tree: its leaves')."""
    return head.projection_allowed_classes() if is_tree(head) else head.class_identity.bool()


@torch.inference_mode()
def nearest_patches(model, dataset, batch_size: int = 64, device: str | torch.device = "cpu") -> list[PrototypeSource]:
    """Each prototype's nearest patch among the images of ``dataset`` whose class it allows, without changing
    the model (the push's search, for prototypes trained after their last push)."""
    from .functional import PrototypeProjector, l2_distances

    head = model.head
    allowed = allowed_classes(head)
    distance = {"distance": l2_distances} if is_tree(head) else {}  # ProtoTree's true L2; ProtoPNet's default
    projector = PrototypeProjector(head.prototypes.detach(), allowed, **distance)
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([im for im, _ in items]).to(device)
        y = torch.tensor([int(lab) for _, lab in items], device=device)
        projector.update(
            head.latent(model.backbone(x)).float(), y, torch.arange(start, start + len(items), device=device)
        )
    res = projector.result()
    kept = getattr(head, "node_kept", torch.ones(head.num_prototypes, dtype=torch.bool))
    return [
        PrototypeSource(
            j,
            int(res.sample_id[j]),
            int(res.h[j]),
            int(res.w[j]),
            bool(res.found[j]),
            torch.nonzero(allowed[j]).flatten().tolist(),
            bool(kept[j]),
        )
        for j in range(head.num_prototypes)
    ]


@dataclass
class PrototypeView:
    """One prototype on its source image: boxes, activation and flags (see :func:`explain_prototypes`).

    :ivar image: the source image ``[S, S, 3]`` in ``[0, 1]``.
    :ivar act: the activation over the latent grid ``[H, W]``.
    :ivar up: ``act`` upsampled to ``[S, S]``.
    :ivar box: the high-activation box; ``rf_box`` the receptive-field box
        (``(top, left, bottom, right)``, inclusive).
    :ivar stats: :func:`patch_flags`'s result.
    """

    source: PrototypeSource
    image: np.ndarray
    act: np.ndarray
    up: np.ndarray
    box: tuple[int, int, int, int]
    rf_box: tuple[int, int, int, int] | None
    stats: dict[str, Any]

    @property
    def flags(self) -> list[str]:
        return self.stats["flags"]


@torch.inference_mode()
def explain_prototypes(
    model,
    dataset,
    sources: list[PrototypeSource],
    rf_info: RFInfo | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> list[PrototypeView]:
    """Recompute each found prototype's activation on its source image, from the model itself.

    One forward pass per distinct source image (in batches). The
    high-activation box is that of the map recomputed from the prototype's
    distance map on its source image (ProtoPNet's push computes it the same way).

    :param model: the stage's model (eval mode).
    :param dataset: the un-augmented training split the sources index.
    :param sources: from :func:`sources_from_record` or :func:`nearest_patches`.
    :param rf_info: the prototype layer's receptive field (:func:`~kdt_prototypes.receptive_field.model_rf_info`);
        ``None``: no receptive-field box.
    """
    found = [s for s in sources if s.found and s.image >= 0]
    ids = sorted({s.image for s in found})
    wanted: dict[int, set[int]] = {}
    for s in found:
        wanted.setdefault(s.image, set()).add(s.prototype)
    images: dict[int, torch.Tensor] = {}
    maps: dict[tuple[int, int], torch.Tensor] = {}  # only the maps shown: (image, prototype) -> [H, W]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        x = torch.stack([dataset[i][0] for i in chunk])
        out = model(x.to(device))
        act = similarity_maps(model.head, out["distances"]).cpu()
        for b, i in enumerate(chunk):
            images[i] = x[b]
            for j in wanted[i]:
                maps[(i, j)] = act[b, j].clone()
    views = []
    for s in found:
        img, a = images[s.image], maps[(s.image, s.prototype)]
        size = (int(img.shape[-2]), int(img.shape[-1]))
        disp = display_image(img)
        box = activation_box(a, size)
        views.append(
            PrototypeView(
                s,
                disp,
                a.numpy(),
                upsample_map(a, size),
                box,
                rf_box(size[0], s.h, s.w, rf_info) if rf_info is not None else None,
                patch_flags(disp, box, a.numpy()),
            )
        )
    return views


@torch.inference_mode()
def explain_image(model, x: torch.Tensor, k: int) -> dict[str, Any]:
    """The prediction for one model input ``x`` ``[3, S, S]`` and its ``k`` most activated prototypes.

    :return: ``outputs`` (the forward pass, batch of one, on the CPU),
        ``prediction``, ``probability`` (softmax of the logits), ``top`` (a
        list of dicts: ``prototype``, ``similarity``, ``location`` ``(h, w)``,
        ``box``, ``up`` (the upsampled activation) and, for ProtoPNet,
        ``class``, ``weight`` (last-layer weight to the predicted class) and
        ``contribution`` = similarity × weight) and ``image`` (display array).
    """
    device = next(model.parameters()).device
    out = {k_: v.cpu() for k_, v in model(x[None].to(device)).items()}
    head = model.head
    pred = int(out["logits"][0].argmax())
    top = head.top_prototypes({k_: v.to(device) for k_, v in out.items()}, k)
    act = similarity_maps(head, out["distances"])[0]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    width = int(out["distances"].shape[-1])
    rows = []
    for r in range(top["prototype"].shape[1]):
        j = int(top["prototype"][0, r])
        loc = int(top["location"][0, r])
        row = {
            "prototype": j,
            "similarity": float(top["similarity"][0, r]),
            "location": (loc // width, loc % width),
            "box": activation_box(act[j], size),
            "up": upsample_map(act[j], size),
        }
        if "contribution" in top:
            row["class"] = int(top["class"][0, r])
            row["weight"] = float(head.last_layer.weight[pred, j])
            row["contribution"] = float(top["contribution"][0, r])
        rows.append(row)
    return {
        "outputs": out,
        "prediction": pred,
        "probability": float(torch.softmax(out["logits"][0].float(), 0)[pred]),
        "top": rows,
        "image": display_image(x),
        "activation": act,
    }


def greedy_path(head, min_distances: torch.Tensor) -> dict[str, Any]:
    """The greedy decision path of a ProtoTree head for one image.

    From the root, right ("present") iff ``s = exp(−d) > 0.5`` (``d < ln 2``);
    a node forced by pruning sends every input to its side and is no decision.

    :param head: a ProtoTree head.
    :param min_distances: ``[N]`` the image's min-pooled L2 distance per node.
    :return: ``{"nodes": [{node, distance, similarity, right, forced}], "leaf",
        "distribution"}`` (``distribution``: the leaf's class probabilities).
    """
    from .functional import LN2

    node, nodes = 0, []
    forced = head.forced.tolist()
    for _ in range(head.depth):
        d = float(min_distances[node])
        f = forced[node]
        right = (f == 1) if f >= 0 else d < LN2
        nodes.append(
            {"node": node, "distance": d, "similarity": float(np.exp(-d)), "right": bool(right), "forced": f >= 0}
        )
        node = 2 * node + 1 + int(right)
    leaf = node - head.num_prototypes  # one prototype per decision node; the leaves follow them in heap order
    return {"nodes": nodes, "leaf": leaf, "distribution": head.leaf_distributions()[leaf].cpu()}
