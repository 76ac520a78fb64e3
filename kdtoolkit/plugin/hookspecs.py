"""Hook specifications of kdtoolkit (the plugin contract).

This module imports neither torch nor any plugin, so that it can be read and
imported cheaply. Every hook is documented in ``docs/plugins.md``; a test fails
when one is missing there.

All hooks are *collect-all* (pluggy calls every implementation and gathers the
non-``None`` results) unless a hook's docstring says otherwise. A hook
implementation may accept fewer arguments than its spec.

Every spec is annotated with the types the core passes and expects back; the
types are imported only for type checkers, so that ``kdt --help`` stays light.
The components the registration hooks register follow the protocols of
:mod:`kdtoolkit.plugin.protocols`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from kdtoolkit.foundation.tables import Table
    from kdtoolkit.plugin.registry import Registry

PROJECT = "kdt"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator marking a plugin function as the implementation of a hook.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdt_register_backbones(registry: Registry) -> None:
    """Register backbone factories.

    :param registry: a :class:`kdtoolkit.plugin.registry.Registry` of kind ``backbone``;
        call ``registry.add(name, factory)``.
    :return: nothing (collect-all; return value ignored).

    A backbone factory is called with the recipe's keyword parameters (and
    ``num_classes=K`` when its signature has a ``num_classes`` parameter) and
    returns an ``nn.Module`` mapping images ``[B,3,S,S]`` to a feature map
    ``[B,C,H,W]``, with integer attributes ``out_channels`` (C) and
    ``reduction`` (the stride S/H). A backbone that is a whole classifier
    returns logits ``[B,K]`` instead (use it with the ``identity`` head).
    The contract: :class:`kdtoolkit.plugin.protocols.BackboneProtocol`.
    """


@hookspec
def kdt_register_heads(registry: Registry) -> None:
    """Register head factories.

    :param registry: a registry of kind ``head``.
    :return: nothing (collect-all).

    A head factory is called as ``factory(in_channels, num_classes, **params)``
    and returns an ``nn.Module`` mapping the backbone's features to a dict of
    outputs with at least ``"logits"`` ``[B,K]``. Class attributes the core
    reads before building anything: ``outputs`` (tuple of output names),
    ``param_groups`` (names usable as ``head.<name>`` in phase groups) and
    ``record_keys`` (outputs saved per test image in evaluation records).
    Optional methods the core calls: ``record_meta(outputs) -> dict``
    (metadata of the evaluation records, e.g. the latent grid ``H``/``W`` that
    a prototype head's ``argmin`` indexes, from the first batch's outputs),
    ``top_prototypes(outputs, k)`` (for ``kdt predict``), and the per-step
    hooks ``on_epoch_start(state)`` and ``on_optimizer_step(state)`` (see
    :mod:`kdtoolkit.engine.loop`). The contract:
    :class:`kdtoolkit.plugin.protocols.HeadProtocol`.
    """


@hookspec
def kdt_register_losses(registry: Registry) -> None:
    """Register loss factories.

    :param registry: a registry of kind ``loss``.
    :return: nothing (collect-all).

    A loss factory (usually a class) is called with the recipe's parameters
    and returns a callable ``loss(step) -> scalar tensor`` where ``step`` is a
    :class:`kdtoolkit.plugin.contracts.Step`. Class attributes read during
    validation: ``requires_teacher`` (bool) and ``requires_outputs`` (tuple of
    head output names). Read during training: ``requires_teacher_outputs``
    (tuple of the teacher's output names the loss reads from
    ``step.teacher_outputs``; ``()`` for a loss that reads only the teacher's
    parameters). The trainer skips the teacher's forward pass in a phase
    whose losses read no teacher output, and a teacher cache keeps only the
    declared outputs; a teacher-using loss that declares nothing gets every
    output. An instance attribute overrides the class attribute (e.g. when
    a parameter decides what is read). ``requires_taps`` and
    ``requires_teacher_taps`` name the taps read from ``step.features`` and
    ``step.teacher_features`` (a tuple, or a callable receiving the loss's
    parameters, e.g. :class:`kdtoolkit.plugin.params.TapsFrom`), checked
    against the stage's ``model.taps`` and ``teacher_taps`` during
    validation; ``requires_labels`` (default true) and ``requires_indices``
    likewise. A loss that is an ``nn.Module`` may own parameters (selectable
    as ``loss.<id>`` in phase groups) and buffers, saved in checkpoints;
    ``setup(probe)`` builds connectors from a dry forward pass;
    ``check_models(model, teacher)`` refuses an incompatible pair of models
    before training; the per-step hooks apply as for heads. See
    :mod:`kdtoolkit.engine.losses`. The contract:
    :class:`kdtoolkit.plugin.protocols.LossProtocol`.
    """


@hookspec
def kdt_register_metrics(registry: Registry) -> None:
    """Register evaluation metric factories.

    :param registry: a registry of kind ``metric``.
    :return: nothing (collect-all).

    A metric factory returns a callable ``metric(records, reference) -> dict``
    computed from evaluation records (:class:`kdtoolkit.results.records.Records`);
    ``reference`` holds the records of the stage's teacher (or ``compare_to``
    stage) or ``None``. Class attributes: ``requires_reference`` (bool),
    ``requires_records`` (tuple of record keys). The contract:
    :class:`kdtoolkit.plugin.protocols.MetricProtocol`.
    """


@hookspec
def kdt_register_datasets(registry: Registry) -> None:
    """Register dataset factories.

    :param registry: a registry of kind ``dataset``.
    :return: nothing (collect-all).

    A dataset factory is called as ``factory(split, augment, **params)`` with
    ``split`` in ``{"train", "test"}`` and returns a map-style dataset of
    ``(image [3,S,S] float tensor, label int)`` with attributes ``classes``,
    ``num_classes`` and ``name``; the class attribute ``provides_labels``
    (default true) and the methods ``preprocess``, ``check_item`` and
    ``get_batch`` are optional. The contract:
    :class:`kdtoolkit.plugin.protocols.DatasetProtocol`.
    """


@hookspec
def kdt_register_phases(registry: Registry) -> None:
    """Register training phase kinds.

    :param registry: a registry of kind ``phase``.
    :return: nothing (collect-all).

    A phase factory is called with the phase's own recipe parameters and
    returns an object with ``run(ctx) -> dict | None`` where ``ctx`` is a
    :class:`kdtoolkit.engine.phases.PhaseContext`; the class attribute
    ``requires_outputs`` names the head outputs it reads. The ``train`` kind is built
    into the engine (its keys are part of the recipe schema); the Proto2Proto
    bundle registers ``push``. A phase kind with the class attribute
    ``trains = True`` is a training loop of its own: its table takes every
    ``train`` key beside its own parameters, the engine runs the standard
    loop, and the phase object's ``on_epoch_start``/``on_optimizer_step``
    methods are called as per-step hooks. The contract:
    :class:`kdtoolkit.plugin.protocols.PhaseProtocol`.
    """


@hookspec
def kdt_register_optimizers(registry: Registry) -> None:
    """Register optimiser factories.

    :param registry: a registry of kind ``optimizer``.
    :return: nothing (collect-all).

    An optimiser factory is called as ``factory(param_groups, **params)``,
    where ``param_groups`` is the phase's list of ``{"params", "lr",
    "weight_decay"}`` dicts, and returns a ``torch.optim.Optimizer``. Its
    annotated keyword parameters are keys of a phase's ``optimizer`` table
    (beside ``name`` and ``weight_decay``, the groups' default). The core
    registers ``adam``, ``adamw`` and ``sgd``.
    """


@hookspec
def kdt_register_schedulers(registry: Registry) -> None:
    """Register learning-rate schedule factories.

    :param registry: a registry of kind ``scheduler``.
    :return: nothing (collect-all).

    A scheduler factory is called as ``factory(optimizer, epochs, **params)``
    (``epochs``: the phase's) and returns a
    ``torch.optim.lr_scheduler.LRScheduler`` stepped once per epoch, or
    ``None`` for a constant rate. Its annotated keyword parameters are keys of
    a phase's ``scheduler`` table (beside ``name``, ``warmup_epochs`` and
    ``warmup_start_factor``, which add a linear warm-up to any schedule). The
    core registers ``none``, ``step``, ``multistep``, ``cosine`` and
    ``exponential``.
    """


@hookspec
def kdt_add_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``kdt`` command line.

    :param cli: the root ``click.Group``; call ``cli.add_command(cmd)``.
    :return: nothing (collect-all).
    """


@hookspec
def kdt_report_tables(results: dict[str, Any], recipe: dict[str, Any]) -> list[Table] | None:
    """Contribute tables to ``results.md`` at the end of a run.

    :param results: the run's results (``results.json`` content: a dict with
        ``"stages"`` mapping stage names to their metrics).
    :param recipe: the resolved recipe (a plain dict).
    :return: a list of :class:`kdtoolkit.foundation.tables.Table` (or ``None``); the
        lists of all plugins are concatenated (collect-all).
    """


@hookspec
def kdt_after_epoch(stage: str, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
    """Called after every training epoch of every phase.

    :param stage: the stage name.
    :param phase: the phase name.
    :param epoch: the epoch number within the phase, from 1 (as in ``metrics.jsonl``).
    :param metrics: the dict written to ``metrics.jsonl`` for this epoch.
    :return: nothing (collect-all, return values ignored).

    In a distributed run it is called on rank 0 only, with metrics of the
    global batch.
    """


@hookspec
def kdt_after_stage(stage: str, result: dict[str, Any], stage_dir: Path) -> None:
    """Called when a stage has been trained and evaluated.

    :param stage: the stage name.
    :param result: the stage's result dict (as in ``results.json``).
    :param stage_dir: ``pathlib.Path`` of the stage's run directory.
    :return: nothing (collect-all, return values ignored).

    In a distributed run it is called on rank 0 only.
    """


@hookspec
def kdt_after_run(run_dir: Path, results: dict[str, Any]) -> None:
    """Called once a run has finished and its reports are written.

    :param run_dir: ``pathlib.Path`` of the run directory.
    :param results: the run's results dict (``results.json`` content).
    :return: nothing (collect-all, return values ignored).
    """
