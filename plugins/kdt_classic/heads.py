"""The heads of the classic bundle: ``linear`` and ``identity``."""

from __future__ import annotations

import torch
from torch import nn

from kdtoolkit.plugin import ParamChecks, Range


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

    check_params = ParamChecks(Range("dropout", ge=0, lt=1))

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
            from kdtoolkit.foundation import RecipeError

            raise RecipeError(
                f"head 'identity' needs a backbone that outputs logits for the {num_classes} classes "
                f"(e.g. timm with classifier = true); this backbone has {in_channels} output channels",
                key="head",
            )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.num_classes:
            raise ValueError(
                f"head 'identity' expects logits [B, {self.num_classes}] from the backbone, got shape {list(x.shape)}"
            )
        return {"logits": x}
