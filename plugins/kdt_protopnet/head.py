"""The ProtoPNet head (method notes §1) as an ``nn.Module``.

``features → add-on → squared-L2 patch distances to P class-specific
prototypes → min-pool (keeping the argmin location) → similarity → last layer``.
The arithmetic lives in :mod:`kdt_protopnet.functional`; this module holds
the parameters and their initialisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdt_prototypes import distance_to_similarity, min_pool_distances, squared_l2_distances
from kdtoolkit.foundation import full_precision

from . import functional as F
from .checks import check_head_params


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def add_on_layers(in_channels: int, depth: int, kind: str) -> nn.Sequential:
    """ProtoPNet's add-on layers, ending in a Sigmoid so z ∈ (0, 1).

    ``regular``: 1×1 conv C→D, ReLU, 1×1 conv D→D, Sigmoid.
    ``bottleneck``: pairs of 1×1 conv–ReLU–conv halving the channels from C
    down to D (ReLU between pairs, Sigmoid at the end).
    Kaiming-normal (fan-out) init, zero bias.
    """
    layers: list[nn.Module] = []
    if kind == "regular":
        layers = [nn.Conv2d(in_channels, depth, 1), nn.ReLU(), nn.Conv2d(depth, depth, 1), nn.Sigmoid()]
    else:
        current = in_channels
        while True:
            nxt = max(depth, current // 2)
            layers += [nn.Conv2d(current, nxt, 1), nn.ReLU(), nn.Conv2d(nxt, nxt, 1)]
            current = nxt
            if current == depth:
                layers.append(nn.Sigmoid())
                break
            layers.append(nn.ReLU())
    seq = nn.Sequential(*layers)
    _kaiming(seq)
    return seq


class ProtoPNetHead(nn.Module):
    """ProtoPNet head: class-specific prototypes compared to every latent patch.

    Outputs: ``logits`` ``[B,K]``, ``min_distances`` ``[B,P]`` (squared L2),
    ``argmin`` ``[B,P]`` (flat location h·W+w of each minimum), ``features``
    (the add-on output z ``[B,D,H,W]``), ``distances`` ``[B,P,H,W]`` (the
    squared-L2 map that ``min_distances`` pools; the correspondence loss
    reads it to find tied minima) and ``similarities`` ``[B,P]``.
    Parameter groups: ``head.add_on``, ``head.prototypes``, ``head.last_layer``.

    :param prototypes_per_class: prototypes per class (paper: 10); P = K × this.
    :param prototype_depth: D, the channels of the add-on output and of each
        prototype (paper: 256 for ResNets, 128 for VGG).
    :param add_on: ``regular`` or ``bottleneck`` add-on layers.
    :param similarity: ``log`` — log((d+1)/(d+1e-4)) — or ``linear`` — −d.
    :param incorrect_strength: initial last-layer weight from a prototype to
        the other classes (own class: +1); paper −0.5.
    """

    outputs = ("logits", "min_distances", "argmin", "features", "distances", "similarities")
    param_groups = ("add_on", "prototypes", "last_layer")
    record_keys = ("min_distances", "argmin")
    class_identity: torch.Tensor  # buffer registered in __init__ (declared here for its type)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        prototypes_per_class: int = 10,
        prototype_depth: int = 128,
        add_on: Literal["regular", "bottleneck"] = "regular",
        similarity: Literal["log", "linear"] = "log",
        incorrect_strength: float = -0.5,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.similarity = similarity
        self.add_on = add_on_layers(in_channels, prototype_depth, add_on)
        p = num_classes * prototypes_per_class
        self.prototypes = nn.Parameter(torch.rand(p, prototype_depth))
        self.register_buffer(
            "class_identity", F.prototype_class_identity(num_classes, prototypes_per_class), persistent=False
        )
        self.last_layer = nn.Linear(p, num_classes, bias=False)
        with torch.no_grad():
            self.last_layer.weight.copy_(F.last_layer_init(self.class_identity, incorrect_strength))

    check_params = staticmethod(check_head_params)

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    def latent(self, f: torch.Tensor) -> torch.Tensor:
        """The add-on output z ∈ (0,1)^{B×D×H×W} for backbone features ``f``."""
        return self.add_on(f)

    @staticmethod
    def record_meta(outputs: dict[str, torch.Tensor]) -> dict[str, int]:
        """Metadata of evaluation records: the latent grid ``H``, ``W`` that ``argmin`` indexes."""
        h, w = outputs["features"].shape[-2:]
        return {"H": int(h), "W": int(w)}

    def top_prototypes(self, outputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """The ``k`` most activated prototypes of each image, for ``kdt predict`` and explanations.

        :param outputs: a :meth:`forward` result for a batch.
        :param k: how many prototypes per image (at most P).
        :return: ``[B, k]`` tensors: ``prototype`` (index, most similar first),
            ``similarity``, ``contribution`` (similarity times the last-layer
            weight to the predicted class: its share of that logit),
            ``class`` (the prototype's class) and ``location`` (flat index
            ``h·W + w`` of its closest latent patch).
        """
        sim = outputs["similarities"].float()
        k = max(1, min(int(k), sim.shape[1]))
        top_sim, idx = sim.topk(k, dim=1)
        pred = outputs["logits"].argmax(dim=1)
        weights = self.last_layer.weight.detach().float()[pred]  # [B, P]
        return {
            "prototype": idx,
            "similarity": top_sim,
            "contribution": top_sim * weights.gather(1, idx),
            "class": self.class_identity.argmax(dim=1)[idx],
            "location": outputs["argmin"].gather(1, idx),
        }

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.add_on(f)
        # Distances in float32 even under bf16/fp16 autocast: ||z||² − 2<z,p> + ||p||²
        # cancels badly in low precision.
        with full_precision(z.device.type):
            z = z.float()
            distances = squared_l2_distances(z, self.prototypes.float())
            min_d, argmin = min_pool_distances(distances)
            sim = distance_to_similarity(min_d, self.similarity)
            logits = self.last_layer(sim)
        return {
            "logits": logits,
            "min_distances": min_d,
            "argmin": argmin,
            "features": z,
            "distances": distances,
            "similarities": sim,
        }
