"""The ProtoPNet bundle's registrations (entry point ``protopnet``).

- head ``protopnet``;
- losses ``cluster``, ``separation``, ``l1_last_layer``;
- phase ``push``.
"""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl

from .head import ProtoPNetHead
from .losses import ClusterLoss, LastLayerL1, SeparationLoss
from .push import PushPhase


@hookimpl
def kdt_register_heads(registry):
    registry.add("protopnet", ProtoPNetHead)


@hookimpl
def kdt_register_losses(registry):
    registry.add("cluster", ClusterLoss)
    registry.add("separation", SeparationLoss)
    registry.add("l1_last_layer", LastLayerL1)


@hookimpl
def kdt_register_phases(registry):
    registry.add("push", PushPhase)
