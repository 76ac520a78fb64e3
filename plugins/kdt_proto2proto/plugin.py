"""The Proto2Proto bundle's registrations (entry point ``proto2proto``).

The distillation method only; the prototype heads come from the ``protopnet``
and ``prototree`` bundles (any head satisfying :mod:`kdt_prototypes.protocol` works).

- losses ``global_explanation``, ``patch_prototype_correspondence``, ``tree_kd``;
- metrics ``aap``, ``ajs``, ``pms``;
- the results tables (Table 1, Table 2, AAP/AJS per τ);
- the ``kdt metrics`` and ``kdt explain`` commands.
"""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_losses(registry):
    registry.add("global_explanation", "kdt_proto2proto.losses:GlobalExplanationLoss")
    registry.add("patch_prototype_correspondence", "kdt_proto2proto.losses:PatchPrototypeCorrespondenceLoss")
    registry.add("tree_kd", "kdt_proto2proto.losses:TreeKDLoss")


@hookimpl
def kdt_register_metrics(registry):
    registry.add("aap", "kdt_proto2proto.evaluation:AAP")
    registry.add("ajs", "kdt_proto2proto.evaluation:AJS")
    registry.add("pms", "kdt_proto2proto.evaluation:PMS")


@hookimpl
def kdt_report_tables(results, recipe):
    from .report import report_tables

    return report_tables(results, recipe)


@hookimpl
def kdt_add_commands(cli):
    from .command import explain, metrics

    cli.add_command(metrics)
    cli.add_command(explain)
