"""Classic knowledge distillation: the components that prove the core general.

- head ``linear``: global average pooling, dropout, a linear classifier;
- head ``identity``: for a backbone that already outputs logits (a whole
  timm classifier, ``classifier = true``);
- loss ``cross_entropy``: the usual supervised loss on logits;
- loss ``hinton_kd`` (also ``kd``): Hinton et al.'s soft-target
  distillation, the KL divergence between temperature-softened teacher and
  student distributions, scaled by T² (optionally on standardised logits);
- the standard distillation methods ``dkd``, ``dist``, ``fitnet``,
  ``attention``, ``similarity_preserving``, ``pkt``, ``rkd`` and ``crd``.

The loss components live in :mod:`kdt_classic.losses` (over the pure
functions of :mod:`kdt_classic.functional`); ``docs/methods.md`` describes
each method.
"""

from __future__ import annotations

import torch
from torch import nn

from kdtoolkit.hookspecs import hookimpl

from .losses import (AttentionLoss, CRDLoss, CrossEntropyLoss, DISTLoss, DKDLoss, FitNetLoss, HintonKDLoss, PKTLoss,
                     RKDLoss, SimilarityPreservingLoss)


class LinearHead(nn.Module):
    """Global average pooling, dropout and a linear classifier.

    Outputs ``logits`` ``[B,K]`` and ``features`` (the backbone's map).

    :param dropout: dropout probability before the classifier.
    """

    outputs = ("logits", "features")
    param_groups = ("classifier",)
    record_keys = ()

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    @staticmethod
    def check_params(params: dict) -> None:
        if not 0 <= params["dropout"] < 1:
            raise ValueError("dropout", f"must be in [0, 1), got {params['dropout']}")

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = f.mean(dim=(2, 3))
        return {"logits": self.classifier(self.dropout(pooled)), "features": f}


class IdentityHead(nn.Module):
    """The backbone already outputs logits: passes them on unchanged.

    For a whole classifier as the backbone (``timm`` with ``classifier =
    true``). Outputs ``logits`` ``[B,K]``; has no parameters.
    """

    outputs = ("logits",)
    param_groups = ()
    record_keys = ()

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if in_channels != num_classes:
            from kdtoolkit.errors import RecipeError

            raise RecipeError(f"head 'identity' needs a backbone that outputs logits for the {num_classes} classes "
                              f"(e.g. timm with classifier = true); this backbone has {in_channels} output channels",
                              key="head")
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.num_classes:
            raise ValueError(f"head 'identity' expects logits [B, {self.num_classes}] from the backbone, "
                             f"got shape {list(x.shape)}")
        return {"logits": x}


@hookimpl
def kdt_register_heads(registry):
    registry.add("linear", LinearHead)
    registry.add("identity", IdentityHead)


@hookimpl
def kdt_register_losses(registry):
    registry.add("cross_entropy", CrossEntropyLoss)
    registry.add("hinton_kd", HintonKDLoss)
    registry.add("kd", HintonKDLoss)
    registry.add("dkd", DKDLoss)
    registry.add("dist", DISTLoss)
    registry.add("fitnet", FitNetLoss)
    registry.add("attention", AttentionLoss)
    registry.add("similarity_preserving", SimilarityPreservingLoss)
    registry.add("pkt", PKTLoss)
    registry.add("rkd", RKDLoss)
    registry.add("crd", CRDLoss)
