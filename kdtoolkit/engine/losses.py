"""A stage's losses: built once, with parameters, state and declared inputs.

A loss component is a callable ``loss(step) -> scalar``. It may also be an
``nn.Module`` with parameters (a FitNets regressor) and buffers (a memory
bank): then it is moved to the device, its parameters are selectable in phase
groups as ``loss.<id>``, its state is saved in checkpoints and resumed
bit-exactly, kept out of the student's ``model.safetensors`` (it goes to the
stage's ``losses.safetensors``), and its gradients are synchronised under DDP
(the student and the loss modules run inside one DDP-wrapped forward).

Declarations read by the engine (class or instance attributes):

- ``requires_teacher``, ``requires_outputs``, ``requires_teacher_outputs``
  (see ``docs/plugins.md``);
- ``requires_taps`` / ``requires_teacher_taps``: the tap names the loss reads
  from ``step.features`` / ``step.teacher_features`` — a tuple of names, or a
  callable receiving the loss's resolved parameters and returning them;
- ``requires_labels`` (default true) and ``requires_indices`` (default
  false), checked before anything trains;
- ``setup(probe)``: called once, before the optimiser exists, with a
  :class:`~kdtoolkit.plugin.contracts.Step` of a dry forward pass (eval mode, no
  gradients) so that connectors infer their shapes — a recipe never states
  channel counts; the probe also carries ``num_train``, the number of
  training images (the size of a per-sample memory);
- ``on_epoch_start(state)`` / ``on_optimizer_step(state)``: per-step hooks
  (see :mod:`kdtoolkit.engine.loop`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdtoolkit.plugin.contracts import Step
from kdtoolkit.foundation.errors import CheckpointError, PluginError, RecipeError, TrainingError
from kdtoolkit.plugin.declared import declared_taps
from kdtoolkit.plugin.instantiation import build_component, factory_kwargs
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import RESERVED_KEYS

#: Keys of a loss's table the core reads itself (never passed to the factory).
CORE_KEYS = RESERVED_KEYS["loss"]


class LossSet:
    """The built losses of one stage, by id.

    :param specs: the stage's resolved ``losses`` list.
    :param plugins: the plugin manager.
    :param stage: the stage name (for messages).
    :param source: the recipe file (for messages).
    :raises PluginError: when a loss factory raises: one line naming the plugin,
        the loss and its recipe key ``stages.<stage>.losses[<i>]``.
    """

    def __init__(self, specs: list[dict[str, Any]], plugins: PluginManager, stage: str, source: str | None = None):
        self.stage = stage
        self.specs = {s["id"]: s for s in specs}
        #: The parameters each loss was built with (what its tap declarations receive), by id.
        self.params: dict[str, dict[str, Any]] = {}
        self.fns = {}
        for i, (lid, s) in enumerate(self.specs.items()):
            try:
                comp = plugins.registry("loss").get(s["name"])
                self.params[lid] = factory_kwargs(comp, s)
                self.fns[lid] = build_component(comp, s)
            except PluginError as exc:
                raise PluginError(
                    exc.message, source=exc.source or source, key=exc.key or f"stages.{stage}.losses[{i}]"
                ) from None

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The losses that are ``nn.Module`` (with parameters or state), by id."""
        return {lid: f for lid, f in self.fns.items() if isinstance(f, nn.Module)}

    def weight(self, lid: str) -> float:
        return self.specs[lid]["weight"]

    def active(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` with a non-zero weight."""
        return [lid for lid in ids if self.specs[lid]["weight"] != 0]

    def taps(self, ids: list[str], attr: str) -> set[str]:
        """Tap names the losses ``ids`` read (``requires_taps`` or ``requires_teacher_taps``)."""
        return {t for lid in ids for t in declared_taps(self.fns[lid], attr, self.params[lid])}

    def needs_setup(self) -> bool:
        return any(hasattr(f, "setup") for f in self.fns.values())

    def setup(self, probe: Step) -> None:
        """Let losses with a ``setup`` method build their connectors from a dry forward pass."""
        for lid, f in self.fns.items():
            if hasattr(f, "setup"):
                try:
                    f.setup(probe)
                except (ValueError, TypeError, KeyError) as exc:
                    raise RecipeError(f"loss '{lid}' cannot be set up for these models: {exc}") from None

    def place(self, ctx) -> None:
        for m in self.modules.values():
            ctx.place(m)

    # -- state ------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``<id>/<name>`` → tensor for every loss module's state (CPU, contiguous)."""
        return {
            f"{lid}/{k}": v.detach().cpu().contiguous()
            for lid, m in self.modules.items()
            for k, v in m.state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Restore what :meth:`state_tensors` gave; a missing or extra entry is a :class:`CheckpointError`."""
        from kdtoolkit.engine.models import load_state_strict

        for lid, m in self.modules.items():
            own = {k[len(lid) + 1 :]: v for k, v in tensors.items() if k.startswith(lid + "/")}
            if not own and not m.state_dict():
                continue
            load_state_strict(m, own, f"{source} (loss '{lid}')")
        extra = {k.split("/", 1)[0] for k in tensors} - set(self.modules)
        if extra:
            raise CheckpointError(
                f"holds state of losses this stage does not have: {', '.join(sorted(extra))}", source=source
            )

    # -- training ---------------------------------------------------------
    def terms(self, step: Step, active: list[str], phase: str, cached: bool) -> dict[str, torch.Tensor]:
        """The value of every active loss for ``step``, in order; a loss that cannot be computed is a
        :class:`TrainingError`."""
        terms = {}
        for lid in active:
            try:
                terms[lid] = self.fns[lid](step)
            except (ValueError, TypeError) as exc:
                hint = ""
                if isinstance(exc, TypeError) and step.teacher_outputs is None and step.teacher is not None:
                    hint = (
                        "; the teacher was not run in this phase because no loss declares teacher outputs it reads "
                        "(requires_teacher_outputs)"
                    )
                raise TrainingError(
                    f"stage '{self.stage}', phase '{phase}': loss '{lid}' cannot be computed: {exc}{hint}"
                ) from None
            except KeyError as exc:
                hint = (
                    " (the teacher cache holds only the outputs the losses declare in requires_teacher_outputs)"
                    if cached
                    else ""
                )
                raise TrainingError(
                    f"stage '{self.stage}', phase '{phase}': loss '{lid}' reads output {exc} "
                    f"that the model does not produce (or a tap the stage does not declare){hint}"
                ) from None
        return terms
