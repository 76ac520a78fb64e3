"""The run context handed down to every part of a run, and a stage's generic state.

A :class:`RunContext` is built once per run by the runner and is frozen: the
device, the precision, channels-last, the distributed context, the progress
display, the plugin manager and the stop flag that Ctrl-C sets. Stage and
phase code receives it instead of a reference back to the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.foundation.errors import Interrupted
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.foundation.progress import Progress
from kdtoolkit.foundation.device import autocast, collective_device


_M = TypeVar("_M", bound=nn.Module)


class StopFlag:
    """Set by the SIGINT handler; read at safe points (a step, a phase or stage boundary)."""

    def __init__(self) -> None:
        self.requested = False


def uses_channels_last(layout: bool | str, module: nn.Module) -> bool:
    """Whether a recipe's ``channels_last`` value (``True``, ``False`` or ``"auto"``) puts ``module``
    in channels-last layout: ``"auto"`` does for modules with 4-D weights (2-D convolutions)."""
    if layout == "auto":
        return any(p.dim() == 4 for p in module.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))
    return bool(layout)


@dataclass(frozen=True)
class RunContext:
    """What every part of a run needs to know about the run, and nothing else.

    :ivar device: the torch device of this process.
    :ivar precision: ``fp32``, ``bf16`` or ``fp16``.
    :ivar channels_last: store 4-D weights and batches channels-last: ``True``, ``False`` or
        ``"auto"`` (for models with 4-D weights, i.e. 2-D convolutions; see :meth:`channels_last_for`).
    :ivar dist: the distributed context (rank, world size).
    :ivar progress: the progress display.
    :ivar plugins: the plugin manager (registries and hooks).
    :ivar stop: the stop flag set by Ctrl-C.
    :ivar checkpoint_every: write a checkpoint every this many epochs (0: only at phase ends).
    :ivar source: the recipe file, for error messages.
    """

    device: torch.device
    precision: str
    channels_last: bool | str
    dist: Dist
    progress: Progress
    plugins: PluginManager
    stop: StopFlag = field(default_factory=StopFlag)
    checkpoint_every: int = 1
    source: str = ""

    def autocast(self):
        """The precision's autocast context on this device."""
        return autocast(self.device, self.precision)

    def channels_last_for(self, module: nn.Module) -> bool:
        """Whether ``module`` runs channels-last: ``channels_last`` itself, or with ``"auto"``,
        whether it has 4-D weights (2-D convolutions; measured as fast or faster on the CPU
        for every convolutional network tried, see docs/performance.md)."""
        return uses_channels_last(self.channels_last, module)

    def place(self, module: _M) -> _M:
        """``module`` on the run's device; with channels-last its 4-D weights in that layout."""
        if self.channels_last_for(module):
            # torch's stubs have no Module.to(device, memory_format=...), which torch accepts
            return module.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module.to(self.device)

    def stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed (on any rank: every rank gets the same answer)."""
        return self.dist.any(self.stop.requested, collective_device(self.device))

    def check_interrupt(self, message: str) -> None:
        """Raise :class:`~kdtoolkit.foundation.errors.Interrupted` with ``message`` when Ctrl-C was pressed."""
        if self.stop_requested():
            raise Interrupted(message)


class StageState:
    """A stage's generic state: JSON values that phases set and checkpoints carry.

    A value may be tied to parameters: ``set("pushed", True,
    reset_when_trained="head.prototypes")`` makes any later train phase whose
    groups train a parameter under ``head.prototypes`` set it back to
    ``False`` (the push phase uses this, so results say whether the evaluated
    prototypes are the pushed ones). The values are written to the stage's
    ``result.json`` and ``model.safetensors`` metadata as ``state``.
    """

    def __init__(self, values: dict[str, Any] | None = None, watch: dict[str, str] | None = None):
        self.values: dict[str, Any] = dict(values or {})
        self.watch: dict[str, str] = dict(watch or {})

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (``default`` when unset)."""
        return self.values.get(key, default)

    def set(self, key: str, value: Any, *, reset_when_trained: str | None = None) -> None:
        """Set ``key`` (a JSON value); optionally reset it to ``False`` once a phase trains ``reset_when_trained``."""
        self.values[key] = value
        if reset_when_trained is not None:
            self.watch[key] = reset_when_trained

    def trained(self, selectors: list[str]) -> None:
        """A train phase is about to train ``selectors``: reset the values watching them."""
        from kdtoolkit.plugin.contracts import selectors_overlap

        for key, sel in self.watch.items():
            if any(selectors_overlap(sel, s) for s in selectors):
                self.values[key] = False

    def to_json(self) -> dict[str, Any]:
        """``{"values": ..., "watch": ...}`` for checkpoints."""
        return {"values": dict(self.values), "watch": dict(self.watch)}
