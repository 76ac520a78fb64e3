"""Classic knowledge distillation: the components that prove the core general.

- head ``linear``: global average pooling, dropout, a linear classifier;
- loss ``cross_entropy``: the usual supervised loss on logits;
- loss ``hinton_kd``: Hinton et al.'s soft-target distillation, the KL
  divergence between temperature-softened teacher and student distributions,
  scaled by T².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.components import Step
from kdtoolkit.hookspecs import hookimpl


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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[B,K]`` against ``targets`` ``[B]``."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's soft-target loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    The T² factor keeps gradient magnitudes comparable across temperatures.
    The teacher's logits are treated as constants.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class CrossEntropyLoss:
    """Cross-entropy of the student's logits against the labels.

    :param label_smoothing: label smoothing in [0, 1).
    """

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @staticmethod
    def check_params(params: dict) -> None:
        if not 0 <= params["label_smoothing"] < 1:
            raise ValueError("label_smoothing", f"must be in [0, 1), got {params['label_smoothing']}")

    def __call__(self, step: Step) -> torch.Tensor:
        return cross_entropy(step.outputs["logits"], step.targets, self.label_smoothing)


class HintonKDLoss:
    """Soft-target distillation from the teacher's logits (Hinton et al., 2015).

    :param temperature: softening temperature T > 0 (the loss is scaled by T²).
    """

    requires_teacher = True
    requires_teacher_outputs = ("logits",)
    requires_outputs = ("logits",)

    def __init__(self, *, temperature: float = 4.0):
        self.temperature = temperature

    @staticmethod
    def check_params(params: dict) -> None:
        if params["temperature"] <= 0:
            raise ValueError("temperature", f"must be > 0, got {params['temperature']}")

    def __call__(self, step: Step) -> torch.Tensor:
        return hinton_kd_loss(step.outputs["logits"], step.teacher_outputs["logits"], self.temperature)


@hookimpl
def kdt_register_heads(registry):
    registry.add("linear", LinearHead)


@hookimpl
def kdt_register_losses(registry):
    registry.add("cross_entropy", CrossEntropyLoss)
    registry.add("hinton_kd", HintonKDLoss)
