"""The ProtoTree loss (method notes §2): NLL of the soft prediction log ŷ."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from kdtoolkit.plugin import Step


class ProtoTreeNLL:
    """ProtoTree's loss: the negative log-likelihood of the true class under
    the tree's soft prediction, ``−log ŷ(x)_y``, batch mean. Reads the head's
    ``log_probabilities`` (``cross_entropy`` on the head's ``logits`` gives the
    same number, since those logits are already log ŷ)."""

    requires_teacher = False
    requires_outputs = ("log_probabilities",)

    def __call__(self, step: Step) -> torch.Tensor:
        return TF.nll_loss(step.outputs["log_probabilities"].float(), step.targets)
