"""Feature taps: intermediate tensors of a model captured by forward hooks.

A recipe names them by dotted module path (``model.taps = { l3 =
"backbone.body.layer3" }`` for the student, ``teacher_taps`` for the teacher);
losses read them as ``step.features[name]`` and ``step.teacher_features[name]``.
Models need no rewriting: a hook on the named module stores its output while
the model runs. Paths are checked against the built model before anything
trains, with a "did you mean" and the module paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kdtoolkit.foundation.errors import RecipeError
from kdtoolkit.plugin.registry import suggest


def module_paths(model: nn.Module) -> list[str]:
    """Every named submodule path of ``model`` (the root excluded)."""
    return [n for n, _ in model.named_modules() if n]


def check_tap_paths(model: nn.Module, taps: dict[str, str], source: str, key: str) -> None:
    """Every tap path names a submodule of ``model``.

    :raises RecipeError: naming ``key.<tap>``, with the closest path and a
        summary of the model's paths.
    """
    paths = module_paths(model)
    known = set(paths)
    for name, path in taps.items():
        if path in known:
            continue
        near = [p for p in paths if p.count(".") <= path.count(".") + 1]
        listing = ", ".join(near[:12]) + (
            f", … and {len(near) - 12} more (kdt inspect lists them all)" if len(near) > 12 else ""
        )
        raise RecipeError(
            f"no module '{path}' in this model{suggest(path, paths)}; module paths: {listing}",
            source=source,
            key=f"{key}.{name}",
        )


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], torch.Tensor):
        return out[-1]  # feature lists (e.g. timm's features_only): the module's last map
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise TypeError(f"module output of type {type(out).__name__} is not a tensor")


class Taps:
    """Forward hooks capturing the outputs of named submodules.

    ``with taps.capture() as features: model(x)`` fills ``features`` (tap name →
    tensor) during the forward pass. Outside :meth:`capture` the hooks record
    nothing, so evaluation and the teacher cache pay nothing for taps.

    :param model: the model to hook.
    :param taps: tap name → module path.
    """

    def __init__(self, model: nn.Module, taps: dict[str, str]):
        self.taps = dict(taps)
        self._sink: dict[str, torch.Tensor] | None = None
        self._handles = []
        modules = dict(model.named_modules())
        for name, path in self.taps.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._sink is not None:
                self._sink[name] = _first_tensor(output)

        return hook

    def __bool__(self) -> bool:
        return bool(self.taps)

    def capture(self) -> _Capture:
        """A context whose value is the dict the next forward pass fills."""
        return _Capture(self)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


class _Capture:
    def __init__(self, taps: Taps):
        self.taps = taps
        self.features: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.taps._sink = self.features
        return self.features

    def __exit__(self, *exc: Any) -> None:
        self.taps._sink = None


def hook_taps(model: nn.Module, taps: dict[str, str] | None, names: Iterable[str] | None = None) -> Taps | None:
    """Hooks on ``model`` for the taps ``taps`` (tap name → module path), or ``None`` when there are none.

    Every hook on a tapped module is placed here (the student's taps for a stage, the teacher's for a
    phase, for the teacher cache and for the loss set-up probe).

    :param names: hook only these taps (the ones the active losses read), in sorted order; by default
        every tap of ``taps``, in the table's order.
    """
    taps = taps or {}
    if names is not None:
        taps = {name: taps[name] for name in sorted(names)}
    return Taps(model, taps) if taps else None


def capturing(taps: Taps | None) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """A context whose value is the dict of taps the next forward pass fills (``{}`` with no taps)."""
    return taps.capture() if taps else contextlib.nullcontext({})


@contextlib.contextmanager
def tapped(model: nn.Module, taps: dict[str, str] | None) -> Iterator[dict[str, torch.Tensor]]:
    """For one forward pass: hook ``model``'s ``taps``, yield the dict that the pass fills, then remove
    the hooks (also when the pass raises)."""
    hooks = hook_taps(model, taps)
    try:
        with capturing(hooks) as features:
            yield features
    finally:
        if hooks is not None:
            hooks.remove()


def output_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, str, int]]:
    """``(path, module type, output shape, own parameters)`` of every submodule for one forward pass of ``x``."""
    rows: dict[str, tuple[str, str, str, int]] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(m, i, out, path=path):
            try:
                shape = "×".join(str(d) for d in _first_tensor(out).shape)
            except TypeError:
                shape = type(out).__name__
            own = sum(p.numel() for p in m.parameters(recurse=False))
            rows[path] = (path, type(m).__name__, shape, own)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    order = [p for p, _ in model.named_modules() if p in rows]
    return [rows[p] for p in order]
