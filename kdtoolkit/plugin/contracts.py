"""Building blocks shared by the core and plugins: the model and the step.

A model is a backbone followed by a head (:class:`Model`). During training,
losses receive a :class:`Step` describing the current batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class Model(nn.Module):
    """``head(backbone(x))``: images ``[B,3,S,S]`` to a dict of outputs.

    Parameter names start with ``backbone.`` or ``head.`` — the selectors that
    phase ``groups`` and ``init_from_teacher`` use.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.backbone(x))
        if not isinstance(out, dict) or "logits" not in out:
            raise TypeError(f"head {type(self.head).__name__} must return a dict with 'logits'")
        return out


@dataclass
class Step:
    """What a loss sees for one training batch.

    :ivar inputs: the images ``[B,3,S,S]``.
    :ivar targets: the labels ``[B]`` (int64).
    :ivar outputs: the student's outputs (dict from its head).
    :ivar model: the student :class:`Model` (unwrapped from DDP).
    :ivar teacher_outputs: the frozen teacher's outputs, computed without
        gradients (or read from the stage's teacher cache, holding the
        outputs the losses declare in ``requires_teacher_outputs``);
        ``None`` in a stage without teacher or in a phase whose losses read
        no teacher output.
    :ivar teacher: the frozen teacher :class:`Model`, or ``None``.
    :ivar features: the student's taps (tap name → tensor), as declared in
        the stage's ``model.taps``.
    :ivar teacher_features: the teacher's taps (``teacher_taps``) that the
        phase's losses declare in ``requires_teacher_taps``; read from the
        teacher cache when the stage uses one.
    :ivar indices: the dataset indices of the batch's images (``[B]``, int64,
        on the device), for losses that keep per-sample memory.
    :ivar epoch: the epoch within the phase, from 1 (for warm-up ramps).
    :ivar phase: the phase name.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    outputs: dict[str, Any]
    model: Model
    teacher_outputs: dict[str, Any] | None = None
    teacher: Model | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None
    epoch: int = 1
    phase: str = ""


def selector_matches(name: str, selector: str) -> bool:
    """Whether the parameter (or module) path ``name`` is ``selector`` or lies under it.

    The one rule every selector follows (phase ``groups``, ``init_from_teacher``,
    stage-state watches): ``head.prototypes`` matches ``head.prototypes`` and
    ``head.prototypes.x``, never ``head.prototypes_extra``.
    """
    return name == selector or name.startswith(selector + ".")


def selectors_overlap(a: str, b: str) -> bool:
    """Whether two selectors can match a common parameter (one lies under the other)."""
    return selector_matches(a, b) or selector_matches(b, a)


def select_parameters(model: nn.Module, selectors: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Named parameters matched by any selector (a dotted name or prefix)."""
    return [(name, p) for name, p in model.named_parameters() if any(selector_matches(name, s) for s in selectors)]
