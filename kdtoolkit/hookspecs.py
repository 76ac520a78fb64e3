"""Hook specifications of kdtoolkit (the plugin contract).

This module imports neither torch nor any plugin, so that it can be read and
imported cheaply. Every hook is documented in ``docs/plugins.md``; a test fails
when one is missing there.

All hooks are *collect-all* (pluggy calls every implementation and gathers the
non-``None`` results) unless a hook's docstring says otherwise. A hook
implementation may accept fewer arguments than its spec.
"""

from __future__ import annotations

import pluggy

PROJECT = "kdt"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator marking a plugin function as the implementation of a hook.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdt_register_backbones(registry):
    """Register backbone factories.

    :param registry: a :class:`kdtoolkit.registry.Registry` of kind ``backbone``;
        call ``registry.add(name, factory)``.
    :return: nothing (collect-all; return value ignored).

    A backbone factory is called with the recipe's keyword parameters and
    returns an ``nn.Module`` mapping images ``[B,3,S,S]`` to a feature map
    ``[B,C,H,W]``, with integer attributes ``out_channels`` (C) and
    ``reduction`` (the stride S/H).
    """


@hookspec
def kdt_register_heads(registry):
    """Register head factories.

    :param registry: a registry of kind ``head``.
    :return: nothing (collect-all).

    A head factory is called as ``factory(in_channels, num_classes, **params)``
    and returns an ``nn.Module`` mapping the backbone's features to a dict of
    outputs with at least ``"logits"`` ``[B,K]``. Class attributes the core
    reads before building anything: ``outputs`` (tuple of output names),
    ``param_groups`` (names usable as ``head.<name>`` in phase groups) and
    ``record_keys`` (outputs saved per test image in evaluation records).
    """


@hookspec
def kdt_register_losses(registry):
    """Register loss factories.

    :param registry: a registry of kind ``loss``.
    :return: nothing (collect-all).

    A loss factory (usually a class) is called with the recipe's parameters
    and returns a callable ``loss(step) -> scalar tensor`` where ``step`` is a
    :class:`kdtoolkit.components.Step`. Class attributes read during
    validation: ``requires_teacher`` (bool) and ``requires_outputs`` (tuple of
    head output names). Read during training: ``requires_teacher_outputs``
    (tuple of the teacher's output names the loss reads from
    ``step.teacher_outputs``; ``()`` for a loss that reads only the teacher's
    parameters). The trainer skips the teacher's forward pass in a phase
    whose losses read no teacher output, and a teacher cache keeps only the
    declared outputs; a teacher-using loss that declares nothing gets every
    output. An instance attribute overrides the class attribute (e.g. when
    a parameter decides what is read).
    """


@hookspec
def kdt_register_metrics(registry):
    """Register evaluation metric factories.

    :param registry: a registry of kind ``metric``.
    :return: nothing (collect-all).

    A metric factory returns a callable ``metric(records, reference) -> dict``
    computed from evaluation records (:class:`kdtoolkit.records.Records`);
    ``reference`` holds the records of the stage's teacher (or ``compare_to``
    stage) or ``None``. Class attributes: ``requires_reference`` (bool),
    ``requires_records`` (tuple of record keys).
    """


@hookspec
def kdt_register_datasets(registry):
    """Register dataset factories.

    :param registry: a registry of kind ``dataset``.
    :return: nothing (collect-all).

    A dataset factory is called as ``factory(split, augment, **params)`` with
    ``split`` in ``{"train", "test"}`` and returns a map-style dataset of
    ``(image [3,S,S] float tensor, label int)`` with attributes ``classes``,
    ``num_classes`` and ``name``.
    """


@hookspec
def kdt_register_phases(registry):
    """Register training phase kinds.

    :param registry: a registry of kind ``phase``.
    :return: nothing (collect-all).

    A phase factory is called with the phase's own recipe parameters and
    returns an object with ``run(ctx) -> dict`` where ``ctx`` is a
    :class:`kdtoolkit.trainer.PhaseContext`. The ``train`` kind is built into
    the trainer (its keys are part of the recipe schema); the Proto2Proto
    bundle registers ``push``.
    """


@hookspec
def kdt_add_commands(cli):
    """Add sub-commands to the ``kdt`` command line.

    :param cli: the root ``click.Group``; call ``cli.add_command(cmd)``.
    :return: nothing (collect-all).
    """


@hookspec
def kdt_report_tables(results, recipe):
    """Contribute tables to ``results.md`` at the end of a run.

    :param results: the run's results (``results.json`` content: a dict with
        ``"stages"`` mapping stage names to their metrics).
    :param recipe: the resolved recipe (a plain dict).
    :return: a list of :class:`kdtoolkit.report.Table` (or ``None``); the
        lists of all plugins are concatenated (collect-all).
    """


@hookspec
def kdt_after_epoch(stage, phase, epoch, metrics):
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
def kdt_after_stage(stage, result, stage_dir):
    """Called when a stage has been trained and evaluated.

    :param stage: the stage name.
    :param result: the stage's result dict (as in ``results.json``).
    :param stage_dir: ``pathlib.Path`` of the stage's run directory.
    :return: nothing (collect-all, return values ignored).

    In a distributed run it is called on rank 0 only.
    """


@hookspec
def kdt_after_run(run_dir, results):
    """Called once a run has finished and its reports are written.

    :param run_dir: ``pathlib.Path`` of the run directory.
    :param results: the run's results dict (``results.json`` content).
    :return: nothing (collect-all, return values ignored).
    """
