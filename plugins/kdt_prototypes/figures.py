"""PNG figures of prototypes: where each prototype came from after a push.

For every prototype, the training image it was projected onto is shown with
the prototype's activation box: the prototype's similarity map over the
latent grid is upsampled (bicubic) to the image size and the box encloses the
pixels at or above the 95th percentile (method notes §1, "Explanation").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as TF

from kdtoolkit.foundation import atomic_savefig

__all__ = ["activation_box", "prototype_boxes", "prototype_figure"]


def activation_box(
    similarity_map: torch.Tensor, size: tuple[int, int], percentile: float = 95.0
) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` (inclusive) of the pixels ≥ the percentile of
    the bicubically upsampled ``[H, W]`` similarity map."""
    up = TF.interpolate(similarity_map[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0]
    thr = torch.quantile(up.flatten(), percentile / 100.0)
    ys, xs = torch.nonzero(up >= thr, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def prototype_boxes(ctx, res, similarity_map) -> dict[int, tuple[int, int, int, int]]:
    """Each found prototype's activation box on the training image it was projected onto.

    :param ctx: the phase context (model, ``data.train_eval``, device).
    :param res: the projection result (``found``, ``sample_id`` per prototype).
    :param similarity_map: ``(z, j) -> [H, W]`` similarity of prototype ``j`` to the
        latent map ``z`` ``[1, D, H, W]`` of its source image (each head's own measure).
    """
    model, ds = ctx.model, ctx.data.train_eval
    out = {}
    for j in range(model.head.num_prototypes):
        if not bool(res.found[j]):
            continue
        img, _ = ds[int(res.sample_id[j])]
        z = model.head.latent(model.backbone(img[None].to(ctx.device))).float()
        out[j] = activation_box(similarity_map(z, j).cpu(), tuple(img.shape[-2:]))
    return out


def _display(img: torch.Tensor) -> torch.Tensor:
    """A ``[3,S,S]`` normalised image rescaled to [0, 1] for display."""
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo + 1e-8)).permute(1, 2, 0).clamp(0, 1)


def _canvas(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], cols: int, gap: int) -> tuple:
    """The images tiled ``cols`` to a row on a white ``[R*(S+gap), C*(S+gap), 3]`` canvas, each
    box drawn in yellow pixels; returns the canvas and each tile's top-left corner."""
    side_h = max(int(im.shape[-2]) for im in images)
    side_w = max(int(im.shape[-1]) for im in images)
    rows = math.ceil(len(images) / cols)
    canvas = torch.ones(rows * (side_h + gap), cols * (side_w + gap), 3)
    corners = []
    for k, (img, box) in enumerate(zip(images, boxes)):
        y0, x0 = (k // cols) * (side_h + gap) + gap, (k % cols) * (side_w + gap) + gap // 2
        tile = _display(img).clone()
        top, left, bottom, right = box
        yellow = torch.tensor([1.0, 0.9, 0.0])
        tile[top, left : right + 1] = yellow
        tile[bottom, left : right + 1] = yellow
        tile[top : bottom + 1, left] = yellow
        tile[top : bottom + 1, right] = yellow
        h, w = tile.shape[:2]
        canvas[y0 : y0 + h, x0 : x0 + w] = tile
        corners.append((y0, x0))
    return canvas, corners


def prototype_figure(
    path: Path,
    images: list[torch.Tensor],
    boxes: list[tuple[int, int, int, int]],
    labels: list[str],
    title: str,
    cols: int = 10,
) -> None:
    """Save a grid of images with one box each as a PNG (``cols`` images a row).

    The images are tiled into one picture drawn on a single set of axes (one
    ``imshow``, one text per label, no layout pass): drawing cost hardly grows
    with the number of images (see ``docs/performance.md``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(cols, max(1, n))
    rows = math.ceil(n / cols)
    side = max(int(im.shape[-2]) for im in images)
    gap = max(4, side // 4)  # room for each label above its tile
    canvas, corners = _canvas(images, boxes, cols, gap)
    fig = plt.figure(figsize=(1.3 * cols, 1.45 * rows + 0.5))
    ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.5 / (1.45 * rows + 0.5) - 0.01))
    ax.imshow(canvas.numpy(), interpolation="nearest", aspect="auto")
    ax.axis("off")
    for (y0, x0), lab in zip(corners, labels):
        ax.text(x0, y0 - 1, lab, fontsize=6, va="bottom", ha="left", clip_on=False)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
