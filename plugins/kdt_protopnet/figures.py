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


def activation_box(similarity_map: torch.Tensor, size: tuple[int, int], percentile: float = 95.0) -> tuple[int, int, int, int]:
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


def prototype_figure(path: Path, images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]],
                     labels: list[str], title: str, cols: int = 10) -> None:
    """Save a grid of images with one box each as a PNG (``cols`` images a row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, box, lab) in enumerate(zip(images, boxes, labels)):
        ax = axes.flat[k]
        ax.imshow(_display(img).numpy(), interpolation="nearest")
        top, left, bottom, right = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False, edgecolor="yellow",
                               linewidth=1.2))
        ax.set_title(lab, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
