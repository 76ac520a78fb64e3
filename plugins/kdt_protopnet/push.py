"""The push (prototype projection) phase, method notes §1 phase 3.

Each prototype is replaced by the nearest latent patch among the
un-augmented training images of its own class. The pass streams over the
push set in batches (:class:`~kdt_prototypes.functional.PrototypeProjector`):
memory is O(P·D + one batch), whatever the size of the dataset. Where each
prototype came from (image index, h, w, distance) is written to
``push-<phase>.json`` in the stage directory, for explanations, with a
figure ``prototypes-<phase>.png``.
"""

from __future__ import annotations

from typing import Any

import torch

from kdt_prototypes import PrototypeProjector
from kdtoolkit.foundation import atomic_write_json

from .checks import check_push_params


class PushPhase:
    """Project every prototype onto its nearest training patch of its own class.

    After a push the stage state's ``pushed`` value is true; a later train
    phase that updates ``head.prototypes`` sets it back to false, so results
    say which model was evaluated.

    :param batch_size: images per batch of the push pass (default: the
        stage's ``eval_batch_size``).
    :param class_specific: project only onto images of the prototype's own
        class (ProtoPNet); ``false`` allows any image.
    :param figure: also save ``prototypes-<phase>.png``: every prototype's
        source image with its activation box (95th percentile of the upsampled
        similarity map); the boxes are also written to ``push-<phase>.json``.
    """

    requires_outputs = ("min_distances",)

    def __init__(self, *, batch_size: int | None = None, class_specific: bool = True, figure: bool = True):
        self.batch_size = batch_size
        self.class_specific = class_specific
        self.figure = figure

    @staticmethod
    def boxes(ctx, res) -> dict[int, tuple[int, int, int, int]]:
        """Each found prototype's activation box on its source image (pixels, inclusive)."""
        from kdt_prototypes import distance_to_similarity, prototype_boxes

        head = ctx.model.head
        return prototype_boxes(
            ctx,
            res,
            lambda z, j: distance_to_similarity(
                ((z[0] - head.prototypes[j].float()[:, None, None]) ** 2).sum(0), head.similarity
            ),
        )

    def _figure(self, ctx, res, boxes) -> None:
        """``prototypes-<phase>.png``: each prototype's source image and activation box."""
        from kdt_prototypes import prototype_figure

        ds = ctx.data.train_eval
        images, labels = [], []
        for j in boxes:
            img, lab = ds[int(res.sample_id[j])]
            images.append(img)
            labels.append(f"p{j} · {ds.classes[lab] if hasattr(ds, 'classes') else lab}")
        prototype_figure(
            ctx.stage_file(f"prototypes-{ctx.phase['name']}.png"),
            images,
            list(boxes.values()),
            labels,
            f"{ctx.stage}: prototypes after push '{ctx.phase['name']}' (source image, 95th-percentile box)",
        )

    check_params = staticmethod(check_push_params)

    @torch.inference_mode()
    def run(self, ctx) -> dict:
        model = ctx.model
        head = model.head
        model.eval()
        allowed = head.class_identity.bool() if self.class_specific else None
        projector = PrototypeProjector(head.prototypes.detach(), allowed)
        bs = self.batch_size or ctx.data.spec["eval_batch_size"]
        n = len(ctx.data.train_eval)
        task = ctx.progress.add(f"{ctx.stage} · {ctx.phase['name']} (push)", total=-(-n // bs))
        offset = 0
        for x, y in ctx.loader("train_eval", bs):
            z = head.latent(model.backbone(x.to(ctx.device))).float()
            ids = torch.arange(offset, offset + x.shape[0])
            projector.update(z, y.to(z.device), ids.to(z.device))
            offset += x.shape[0]
            ctx.progress.advance(task)
        ctx.progress.finish(task)
        res = projector.result()  # every rank pushed over the full set: identical prototypes
        old = head.prototypes.detach().clone()
        with torch.no_grad():
            head.prototypes.copy_(res.prototypes.to(head.prototypes.device, head.prototypes.dtype))
        moved = (head.prototypes.detach() - old).norm(dim=1)
        info: dict[str, list[dict[str, Any]]] = {
            "prototypes": [
                {
                    "prototype": j,
                    "class": int(head.class_identity[j].argmax()) if self.class_specific else None,
                    "image": int(res.sample_id[j]),
                    "h": int(res.h[j]),
                    "w": int(res.w[j]),
                    "distance": float(res.distance[j]),
                    "found": bool(res.found[j]),
                }
                for j in range(head.num_prototypes)
            ]
        }
        if ctx.dist.is_main and ctx.stage_dir is not None:
            path = ctx.stage_file(f"push-{ctx.phase['name']}.json")  # checked before anything is written
            boxes = self.boxes(ctx, res) if self.figure else {}
            for j, box in boxes.items():
                info["prototypes"][j]["box"] = list(box)
            atomic_write_json(path, info)
            if self.figure:
                self._figure(ctx, res, boxes)
        ctx.state.set("pushed", True, reset_when_trained="head.prototypes")
        return {
            "prototypes": head.num_prototypes,
            "not_found": int((~res.found).sum()),
            "mean_distance_moved": float(moved.mean()),
            "images": n,
        }
