"""The Proto2Proto bundle's registrations (entry point ``proto2proto``).

- head ``protopnet``;
- losses ``cluster``, ``separation``, ``l1_last_layer``, ``global_explanation``,
  ``patch_prototype_correspondence``;
- phase ``push``;
- metrics ``aap``, ``ajs``, ``pms``;
- the results tables (Table 1, Table 2, AAP/AJS per τ);
- the ``kdt metrics`` command.
"""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl

from .evaluation import AAP, AJS, PMS
from .losses import (
    ClusterLoss,
    GlobalExplanationLoss,
    LastLayerL1,
    PatchPrototypeCorrespondenceLoss,
    SeparationLoss,
)
from .protopnet import ProtoPNetHead
from .push import PushPhase


@hookimpl
def kdt_register_heads(registry):
    registry.add("protopnet", ProtoPNetHead)


@hookimpl
def kdt_register_losses(registry):
    registry.add("cluster", ClusterLoss)
    registry.add("separation", SeparationLoss)
    registry.add("l1_last_layer", LastLayerL1)
    registry.add("global_explanation", GlobalExplanationLoss)
    registry.add("patch_prototype_correspondence", PatchPrototypeCorrespondenceLoss)


@hookimpl
def kdt_register_phases(registry):
    registry.add("push", PushPhase)


@hookimpl
def kdt_register_metrics(registry):
    registry.add("aap", AAP)
    registry.add("ajs", AJS)
    registry.add("pms", PMS)


@hookimpl
def kdt_report_tables(results, recipe):
    from .report import report_tables

    return report_tables(results, recipe)


@hookimpl
def kdt_add_commands(cli):
    from .command import metrics

    cli.add_command(metrics)
