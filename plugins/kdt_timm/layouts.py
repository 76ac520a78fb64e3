"""Key names of weight files, brought into timm's layout before the strict check.

Three steps, in this order (see ``docs/timm.md``):

1. the recipe's own remapping: ``weights_ignore`` (prefixes of the file's
   keys to drop) and ``weights_rename`` (prefix in the file → prefix in
   timm's layout), applied to the names as stored in the file;
2. the wrapper prefixes ``module.`` (DataParallel/DDP) and ``model.``,
   stripped when every key carries them;
3. torchvision's layouts where they differ from timm's: the VGG classifier
   (``classifier.0/3/6`` → ``pre_logits.fc1``/``pre_logits.fc2``/``head.fc``,
   the fully connected weights reshaped into timm's convolutions) and the
   DenseNet names of torchvision's download files (``denselayer1.norm.1`` →
   ``denselayer1.norm1``). A key is converted only when its own name is not a
   key of the model and the converted name is, so a timm-layout file is
   never touched. ResNets have the same names in both libraries.
"""

from __future__ import annotations

import re

import torch

#: Key prefixes stripped from weight files when every key carries them (DataParallel/DDP and wrapper exports).
STRIP_PREFIXES = ("module.", "model.")

#: torchvision VGG classifier layers → timm VGG (its classifier runs as convolutions: ``pre_logits`` then ``head``).
VGG_CLASSIFIER = {"classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2.", "classifier.6.": "head.fc."}

#: Legacy torchvision DenseNet names: ``denselayerN.norm.1.weight`` is ``denselayerN.norm1.weight`` today.
_DENSENET_LEGACY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def apply_recipe_mapping(
    state: dict[str, torch.Tensor], rename: dict[str, str] | None, ignore: list[str] | None
) -> tuple[dict[str, torch.Tensor], int]:
    """Drop the keys under an ``ignore`` prefix, then rename the longest matching ``rename`` prefix of each key.

    :returns: the new state and the number of keys dropped.
    """
    ignored = tuple(ignore or ())
    kept = {k: v for k, v in state.items() if not k.startswith(ignored)} if ignored else dict(state)
    dropped = len(state) - len(kept)
    if not rename:
        return kept, dropped
    prefixes = sorted(rename, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in kept.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        new = key if old is None else rename[old] + key[len(old) :]
        if new in out:
            raise ValueError(f"weights_rename maps two keys of the file to '{new}'")
        out[new] = value
    return out, dropped


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``model.`` (repeatedly, in any order) when every key starts with it."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _torchvision_name(key: str) -> str:
    """timm's name for a key of a torchvision VGG or DenseNet file (the key itself for anything else)."""
    for old, new in VGG_CLASSIFIER.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return _DENSENET_LEGACY.sub(r"\1\2.", key)


def convert_torchvision(
    state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], int]:
    """Rename (and for VGG's classifier, reshape) the keys of torchvision files that timm names otherwise.

    :param shapes: every key of the complete timm model and its shape.
    :returns: the converted state and the number of keys converted.
    """
    out: dict[str, torch.Tensor] = {}
    converted = 0
    for key, value in state.items():
        new = key if key in shapes else _torchvision_name(key)
        if new != key and new in shapes and new not in state:
            target = shapes[new]
            if tuple(value.shape) != target and value.numel() == _numel(target):
                value = value.reshape(target)  # a Linear weight as timm's equivalent convolution
            converted += 1
            out[new] = value
        else:
            out[key] = value
    return out, converted


def to_timm_layout(
    state: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    *,
    rename: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The three steps of this module; returns the state and counts (``dropped``, ``converted``)."""
    state, dropped = apply_recipe_mapping(state, rename, ignore)
    state = strip_wrapper_prefixes(state)
    state, converted = convert_torchvision(state, shapes)
    return state, {"dropped": dropped, "converted": converted}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
