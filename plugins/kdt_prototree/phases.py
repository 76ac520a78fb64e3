"""ProtoTree's phases after training (method notes §2): pruning and projection.

``prune`` removes the subtrees whose leaves are all uninformative;
``project`` replaces each node's prototype by its nearest training patch
among images of the classes its subtree predicts, streaming over the
un-augmented training set (memory O(N·D + one batch)). Both record what they
did in the stage history (and ``metrics.jsonl``) and in the stage state.
"""

from __future__ import annotations

import torch

from kdtoolkit.foundation import atomic_write_json

from .checks import check_project_params, check_prune_params


def tree_head(model):
    """The model's head, which must be a ProtoTree head."""
    head = model.head
    if not hasattr(head, "prune") or not hasattr(head, "projector"):
        raise TypeError(f"{type(head).__name__} is not a ProtoTree head")
    return head


class PrunePhase:
    """Prune the tree: remove every maximal subtree whose leaves all have a
    maximum class probability ≤ ``threshold``, its parent's other child taking
    the parent's place (the authors' rule). Predictions through the kept
    leaves are unchanged; the removed ones get probability 0. Recorded: the
    kept leaves and decision nodes, and the roots of the removed subtrees;
    stage state ``pruned``.

    :param threshold: the uninformative-leaf threshold (paper: 0.01).
    """

    requires_outputs = ("leaf_log_probabilities",)

    def __init__(self, *, threshold: float = 0.01):
        self.threshold = threshold

    check_params = staticmethod(check_prune_params)

    @torch.no_grad()
    def run(self, ctx) -> dict:
        head = tree_head(ctx.model)
        pruning = head.prune(self.threshold)
        out = {
            "threshold": self.threshold,
            "leaves": head.num_leaves,
            "leaves_kept": int(pruning.leaf_kept.sum()),
            "nodes": head.num_prototypes,
            "nodes_kept": int(pruning.node_kept.sum()),
            "removed_subtrees": list(pruning.removed),
        }
        ctx.state.set("pruned", {"leaves_kept": out["leaves_kept"], "nodes_kept": out["nodes_kept"]})
        ctx.progress.log(
            f"stage [bold]{ctx.stage}[/]: pruned {out['leaves'] - out['leaves_kept']} of {out['leaves']} leaves "
            f"({out['nodes_kept']} of {out['nodes']} decision nodes kept)"
        )
        return out


class ProjectPhase:
    """Project every node prototype onto its nearest training patch (true L2)
    among the un-augmented training images whose label is the argmax class of
    some (kept) leaf below the node, streaming in batches. Writes
    ``project-<phase>.json`` (per node: image index, h, w, distance, allowed
    classes, activation box) and, with ``figure``, ``prototypes-<phase>.png``.
    Sets the stage state ``pushed`` (the evaluated prototypes are training
    patches) until a later phase trains ``head.prototypes``.

    :param batch_size: images per batch (default: the stage's ``eval_batch_size``).
    :param figure: also save the figure of each node's source patch.
    """

    requires_outputs = ("leaf_log_probabilities",)

    def __init__(self, *, batch_size: int | None = None, figure: bool = True):
        self.batch_size = batch_size
        self.figure = figure

    check_params = staticmethod(check_project_params)

    @staticmethod
    def _boxes(ctx, res) -> dict[int, tuple[int, int, int, int]]:
        from kdt_prototypes import l2_distances, prototype_boxes

        head = ctx.model.head
        return prototype_boxes(
            ctx, res, lambda z, j: torch.exp(-l2_distances(z, head.prototypes[j : j + 1].float())[0, 0])
        )

    @torch.inference_mode()
    def run(self, ctx) -> dict:
        model = ctx.model
        head = tree_head(model)
        allowed = head.projection_allowed_classes()
        projector = head.projector()
        bs = self.batch_size or ctx.data.spec["eval_batch_size"]
        n = len(ctx.data.train_eval)
        task = ctx.progress.add(f"{ctx.stage} · {ctx.phase['name']} (project)", total=-(-n // bs))
        offset = 0
        for x, y in ctx.loader("train_eval", bs):
            z = head.latent(model.backbone(x.to(ctx.device))).float()
            ids = torch.arange(offset, offset + x.shape[0], device=z.device)
            projector.update(z, y.to(z.device), ids)
            offset += x.shape[0]
            ctx.progress.advance(task)
        ctx.progress.finish(task)
        res = projector.result()  # every rank projected over the full set: identical prototypes
        old = head.prototypes.detach().clone()
        head.apply_projection(res)
        moved = (head.prototypes.detach() - old).norm(dim=1)
        kept = head.node_kept
        info = {
            "prototypes": [
                {
                    "prototype": j,
                    "node_kept": bool(kept[j]),
                    "classes": torch.nonzero(allowed[j]).flatten().tolist(),
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
            path = ctx.stage_file(f"project-{ctx.phase['name']}.json")  # checked before anything is written
            boxes = self._boxes(ctx, res) if self.figure else {}
            for j, box in boxes.items():
                info["prototypes"][j]["box"] = list(box)
            atomic_write_json(path, info)
            if self.figure and boxes:
                from kdt_prototypes import prototype_figure

                ds = ctx.data.train_eval
                images = [ds[int(res.sample_id[j])][0] for j in boxes]
                labels = [f"node {j}" + ("" if bool(kept[j]) else " (pruned)") for j in boxes]
                prototype_figure(
                    ctx.stage_file(f"prototypes-{ctx.phase['name']}.png"),
                    images,
                    list(boxes.values()),
                    labels,
                    f"{ctx.stage}: node prototypes after projection '{ctx.phase['name']}'",
                )
        ctx.state.set("pushed", True, reset_when_trained="head.prototypes")
        return {
            "prototypes": head.num_prototypes,
            "not_found": int((~res.found).sum()),
            "mean_distance_moved": float(moved.mean()),
            "images": n,
        }
