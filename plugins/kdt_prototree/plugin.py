"""The ProtoTree bundle's registrations (entry point ``prototree``).

- head ``prototree``;
- loss ``prototree_nll``;
- phases ``prune`` and ``project``;
- metric ``tree_modes`` and its table in ``results.md``.
"""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_heads(registry):
    registry.add("prototree", "kdt_prototree.head:ProtoTreeHead")


@hookimpl
def kdt_register_losses(registry):
    registry.add("prototree_nll", "kdt_prototree.losses:ProtoTreeNLL")


@hookimpl
def kdt_register_phases(registry):
    registry.add("prune", "kdt_prototree.phases:PrunePhase")
    registry.add("project", "kdt_prototree.phases:ProjectPhase")


@hookimpl
def kdt_register_metrics(registry):
    registry.add("tree_modes", "kdt_prototree.metrics:TreeModes")


@hookimpl
def kdt_report_tables(results, recipe):
    from .report import report_tables

    return report_tables(results, recipe)
