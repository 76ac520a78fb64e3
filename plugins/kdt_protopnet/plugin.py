"""The ProtoPNet bundle's registrations (entry point ``protopnet``).

- head ``protopnet``;
- losses ``cluster``, ``separation``, ``l1_last_layer``;
- phase ``push``.
"""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_heads(registry):
    registry.add("protopnet", "kdt_protopnet.head:ProtoPNetHead")


@hookimpl
def kdt_register_losses(registry):
    registry.add("cluster", "kdt_protopnet.losses:ClusterLoss")
    registry.add("separation", "kdt_protopnet.losses:SeparationLoss")
    registry.add("l1_last_layer", "kdt_protopnet.losses:LastLayerL1")


@hookimpl
def kdt_register_phases(registry):
    registry.add("push", "kdt_protopnet.push:PushPhase")
