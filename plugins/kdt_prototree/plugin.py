"""The ProtoTree bundle's registrations (entry point ``prototree``).

- head ``prototree``;
- loss ``prototree_nll``;
- phases ``prune`` and ``project``;
- metric ``tree_modes`` and its table in ``results.md``.
"""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl

from .head import ProtoTreeHead
from .losses import ProtoTreeNLL
from .metrics import TreeModes
from .phases import ProjectPhase, PrunePhase


@hookimpl
def kdt_register_heads(registry):
    registry.add("prototree", ProtoTreeHead)


@hookimpl
def kdt_register_losses(registry):
    registry.add("prototree_nll", ProtoTreeNLL)


@hookimpl
def kdt_register_phases(registry):
    registry.add("prune", PrunePhase)
    registry.add("project", ProjectPhase)


@hookimpl
def kdt_register_metrics(registry):
    registry.add("tree_modes", TreeModes)


@hookimpl
def kdt_report_tables(results, recipe):
    from .report import report_tables

    return report_tables(results, recipe)
