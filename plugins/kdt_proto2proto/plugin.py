"""The Proto2Proto bundle's registrations (entry point ``proto2proto``).

The distillation method only; the prototype heads come from the ``protopnet``
and ``prototree`` bundles (any head satisfying :mod:`.protocol` works).

- losses ``global_explanation``, ``patch_prototype_correspondence``, ``tree_kd``;
- metrics ``aap``, ``ajs``, ``pms``;
- the results tables (Table 1, Table 2, AAP/AJS per τ);
- the ``kdt metrics`` command.
"""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl

from .evaluation import AAP, AJS, PMS
from .losses import GlobalExplanationLoss, PatchPrototypeCorrespondenceLoss, TreeKDLoss


@hookimpl
def kdt_register_losses(registry):
    registry.add("global_explanation", GlobalExplanationLoss)
    registry.add("patch_prototype_correspondence", PatchPrototypeCorrespondenceLoss)
    registry.add("tree_kd", TreeKDLoss)


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
