"""Models of a stage: build, load, save, initialise from the teacher, select parameters.

A model is a backbone followed by a head (:class:`~kdtoolkit.plugin.contracts.Model`).
A backbone factory whose signature has a ``num_classes`` parameter receives
the dataset's class count (a whole classifier used as the model).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtoolkit.plugin.contracts import Model, selector_matches
from kdtoolkit.foundation.errors import CheckpointError, RecipeError
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.instantiation import build_component, instantiate
from kdtoolkit.foundation.tensorfiles import atomic_save_safetensors, load_external_state_dict, read_kdt_safetensors

MODEL_FORMAT = "kdtoolkit.model/1"


def _accepts(factory: Any, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_model(stage: dict[str, Any], num_classes: int, plugins: PluginManager) -> Model:
    """The stage's backbone + head (random or pretrained init; ``model.weights`` loaded strictly).

    :raises PluginError: when the backbone or head factory raises, naming the plugin and the component.
    """
    bspec, hspec = stage["model"]["backbone"], stage["model"]["head"]
    bcomp = plugins.registry("backbone").get(bspec["name"])
    extra = {"num_classes": num_classes} if _accepts(bcomp.factory, "num_classes") else {}
    backbone = build_component(bcomp, bspec, **extra)
    head = instantiate("head", hspec, backbone.out_channels, num_classes, plugins=plugins)
    model = Model(backbone, head)
    if stage["model"].get("weights"):
        path = Path(stage["model"]["weights"])
        load_state(model, load_external_state_dict(path), str(path), strict=stage["model"].get("strict", True))
    return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and decoded metadata of a ``model.safetensors``."""
    return read_kdt_safetensors(path, MODEL_FORMAT, "model file")


def save_model_file(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights atomically with JSON metadata (``format`` is added)."""
    atomic_save_safetensors(
        model_state(model), path, {"format": MODEL_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    )


def state_mismatch(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong shape)`` key lists of ``state`` against a module's ``own`` state."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, wrong


def describe_mismatch(missing: list[str], unexpected: list[str], wrong: list[str], own: dict, state: dict) -> str:
    """One line: the counts, the first names, the likely cause."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with another shape (first: {k} {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model)"
        )
    cause = (
        "likely another architecture, depth or width"
        if (missing and unexpected) or wrong
        else "likely a file of a smaller model or of part of one"
        if missing
        else "likely a file of a larger model"
    )
    return f"weights do not match the model: {'; '.join(parts)} — {cause}"


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, *, strict: bool = True) -> None:
    """Load ``state`` into ``module``.

    Strictly (default), any missing, unexpected or mis-shaped key is a
    :class:`CheckpointError` naming ``source`` with the counts and the likely
    cause. With ``strict=False`` the keys that fit are loaded; a file sharing
    no key with the module, or with a mis-shaped key, is still an error.
    """
    own = module.state_dict()
    missing, unexpected, wrong = state_mismatch(own, state)
    if (strict and (missing or unexpected)) or wrong or len(missing) == len(own):
        raise CheckpointError(describe_mismatch(missing, unexpected, wrong, own, state), source=source)
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """:func:`load_state` with ``strict=True``."""
    load_state(module, state, source, strict=True)


def init_from_teacher(model: nn.Module, teacher: nn.Module, selectors: list[str], source: str, key: str) -> None:
    """Copy the teacher's tensors under ``selectors`` into ``model`` (shapes must agree).

    :raises RecipeError: naming ``key`` when a shape differs or nothing is selected.
    """
    tstate = teacher.state_dict()
    sstate = model.state_dict()
    copied = 0
    for k in sstate:
        if any(selector_matches(k, s) for s in selectors):
            if k not in tstate or tstate[k].shape != sstate[k].shape:
                got = tuple(tstate[k].shape) if k in tstate else "absent"
                raise RecipeError(
                    f"cannot copy '{k}' from the teacher: shapes {got} vs {tuple(sstate[k].shape)}",
                    source=source,
                    key=key,
                )
            sstate[k] = tstate[k].detach().clone()
            copied += 1
    if not copied:
        raise RecipeError("selects no parameter of the model", source=source, key=key)
    model.load_state_dict(sstate)


def trainable_parameters(model: nn.Module, loss_modules: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Every parameter a phase group may select: the model's (``backbone.*``,
    ``head.*``) and those of loss modules (``loss.<id>.*``)."""
    named = list(model.named_parameters())
    for lid, module in loss_modules.items():
        named += [(f"loss.{lid}.{n}", p) for n, p in module.named_parameters()]
    return named


def select(named: list[tuple[str, nn.Parameter]], selectors: list[str]) -> list[tuple[str, nn.Parameter]]:
    """The entries of ``named`` matched by any selector."""
    return [(n, p) for n, p in named if any(selector_matches(n, s) for s in selectors)]


def check_phase_selectors(
    named: list[tuple[str, nn.Parameter]], stage: dict[str, Any], stage_name: str, source: str
) -> None:
    """Every train phase's groups select at least one parameter of the built model and losses.

    :raises RecipeError: naming the group's ``params`` key otherwise.
    """
    for i, ph in enumerate(stage["phases"]):
        for g, grp in enumerate(ph.get("groups") or []):
            if not select(named, grp["params"]):
                raise RecipeError(
                    f"selects no parameter of this model ({', '.join(grp['params'])})",
                    source=source,
                    key=f"stages.{stage_name}.phases[{i}].groups[{g}].params",
                )
