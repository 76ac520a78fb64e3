"""Plugin ``timm``: any timm model as a backbone (see :mod:`kdt_timm.backbone`).

Registers the backbone by reference, so listing plugins imports neither
torch nor timm.
"""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_backbones(registry):
    registry.add("timm", "kdt_timm.backbone:TimmBackbone")
