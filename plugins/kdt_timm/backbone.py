"""Any timm model as a backbone, cut at a chosen stage, or a whole timm classifier.

Uses timm's ``features_only`` mode and ``feature_info`` (channels and stride
of every stage) rather than hand-written wrappers. Weights: random init
(default), timm's own pretrained loading (``pretrained = true``, needs
network on the user's machine) or a local file (``weights = "x.safetensors"``),
which this plugin reads itself and loads strictly (see ``docs/timm.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_backbone_params
from .layouts import to_timm_layout

log = logging.getLogger("kdt.timm")


class TimmBackbone(nn.Module):
    """A timm model as a feature extractor: images to the feature map of one stage.

    With ``classifier = true`` the backbone is instead the complete timm model
    (its own pooling and classifier), outputting logits ``[B,K]``; pair it
    with the head ``identity``. The core passes the number of classes as
    ``num_classes`` (not a recipe key).

    Pitfall: timm zero-initialises the last BatchNorm of every residual block
    (``zero_init_last``). From random init with a small backbone learning rate
    this trains much more slowly than torchvision's ResNets: on the digits
    image folder with the same ProtoPNet settings (ResNet-18 cut at layer 2,
    backbone lr 1e-4, 6 epochs) a torchvision ResNet-18 reached 0.96 test
    accuracy and the timm ResNet-18 0.59. ``model_kwargs = { zero_init_last =
    false }`` avoids it.

    :param model: a timm model name (``resnet18``, ``resnet50``, ``vgg11``,
        ``densenet121``, ...), optionally with a pretrained tag
        (``resnet50.tv_in1k``: torchvision's ImageNet weights with
        ``pretrained = true``); ``timm.list_models()`` lists them.
    :param out_index: which feature stage to return, as an index into timm's
        ``feature_info`` (``-1``: the last, stride 32 for ResNets; ``2`` is
        stride 8 and ``3`` stride 16). ``-1`` gives the 7×7 grid of a 224 px
        image for ResNets, VGGs (after the last max-pool, 512 channels, as
        ProtoPNet's VGG features) and DenseNets. Ignored with ``classifier = true``.
    :param classifier: use the complete timm model (pooling and classifier
        for the recipe's classes) instead of a feature map; the output is
        logits ``[B,K]``, ``out_channels`` is K and ``reduction`` is none.
    :param pretrained: load timm's pretrained weights (downloads on first use;
        never in tests).
    :param weights: load weights from this local ``.safetensors`` (or
        ``.pth``/``.bin``, read with ``weights_only``) file instead. Keys
        prefixed ``module.``/``model.`` are accepted, and so are torchvision's
        VGG and DenseNet files (converted to timm's names); a feature-map
        backbone ignores the keys of the stages and classifier it cuts away.
    :param weights_rename: with ``weights``: prefixes of the file's keys
        renamed to timm's, e.g. ``{ "module.backbone." = "" }``; the longest
        matching prefix of each key applies.
    :param weights_ignore: with ``weights``: prefixes of the file's keys
        dropped before the strict check (e.g. a second branch or another
        classifier). Both see the names as stored in the file.
    :param strict: with ``weights``: refuse a file with missing, unexpected or
        differently shaped keys (false: load what fits and log the counts).
    :param drop_path_rate: stochastic depth rate, for models that support it.
    :param model_kwargs: more keyword arguments for ``timm.create_model``,
        e.g. ``{ zero_init_last = false }``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        model: str,
        out_index: int = -1,
        classifier: bool = False,
        pretrained: bool = False,
        weights: Path | None = None,
        strict: bool = True,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        weights_rename: dict[str, str] | None = None,
        weights_ignore: list[str] | None = None,
    ):
        super().__init__()
        import timm

        from kdtoolkit.foundation import RecipeError

        kwargs = dict(model_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        try:
            if classifier:
                if num_classes is None:
                    raise RecipeError(
                        "classifier = true needs the number of classes, which this kdtoolkit "
                        "version does not pass to backbones",
                        key="classifier",
                    )
                self.body = timm.create_model(model, pretrained=pretrained, num_classes=num_classes, **kwargs)
                self.out_channels = int(num_classes)
                self.reduction = None
            else:
                # Random-number parity with earlier releases, which built this
                # model twice (once to count its stages): the first
                # construction only advances the generator exactly as before,
                # so a fixed seed gives the same weights (and the same head
                # init after it). timm itself resolves a negative out_index.
                # a timm model: its feature_info is timm's (torch's stubs type module attributes as Tensor | Module)
                probe: Any = timm.create_model(model, pretrained=False, features_only=True, **kwargs)
                n = len(probe.feature_info)
                del probe
                if not -n <= out_index < n:
                    raise RecipeError(
                        f"timm model '{model}' has {n} feature stages (0 to {n - 1}, or -1 to -{n}), got {out_index}",
                        key="out_index",
                    )
                self.body = timm.create_model(
                    model, pretrained=pretrained, features_only=True, out_indices=(out_index,), **kwargs
                )
                info: Any = self.body.feature_info
                self.out_channels = int(info.channels()[-1])
                self.reduction = int(info.reduction()[-1])
        except TypeError as exc:
            if not model_kwargs:
                raise
            raise RecipeError(
                f"timm model '{model}' does not accept these arguments: {' '.join(str(exc).split())}",
                key="model_kwargs",
            ) from None
        self.model_name = model
        self.classifier = classifier
        #: counts of the last weights load (``loaded``, ``missing``, ``unexpected``, ``shape``, ``ignored``,
        #: and from the key mapping ``dropped`` and ``converted``).
        self.weights_report: dict[str, int] | None = None
        if weights is not None:
            self.weights_report = self._load_weights(
                Path(weights), strict, kwargs, rename=weights_rename, ignore=weights_ignore
            )

    check_params = staticmethod(check_backbone_params)

    # -- weights --------------------------------------------------------
    def _reference_keys(self, kwargs: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """Shapes of every key of the complete model, and its classifier's keys.

        Built on the meta device (no memory, no random numbers drawn).
        """
        full: Any  # a timm model (get_classifier is timm's)
        if self.classifier:
            full = self.body
        else:
            import timm

            with torch.random.fork_rng(devices=[]):
                try:
                    with torch.device("meta"):
                        full = timm.create_model(self.model_name, pretrained=False, **kwargs)
                except Exception:  # a model that cannot be built on the meta device
                    full = timm.create_model(self.model_name, pretrained=False, **kwargs)
        shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
        head = full.get_classifier() if hasattr(full, "get_classifier") else None
        names = [n for n, m in full.named_modules() if m is head and n] if isinstance(head, nn.Module) else []
        head_keys = {k for k in shapes if any(k.startswith(n + ".") for n in names)}
        return shapes, head_keys

    @staticmethod
    def _candidates(key: str) -> list[str]:
        """Names a key of the feature-map model may have in the complete model.

        timm's feature wrappers flatten ``stages.0`` to ``stages_0`` or nest
        the model under ``model.``.
        """
        out = [key]
        if key.startswith("model."):
            out.append(key[len("model.") :])
        first, _, rest = key.partition(".")
        for i, c in enumerate(first):
            if c == "_":
                out.append(f"{first[:i]}.{first[i + 1 :]}" + (f".{rest}" if rest else ""))
        return out

    def _load_weights(
        self,
        path: Path,
        strict: bool,
        kwargs: dict[str, Any],
        *,
        rename: dict[str, str] | None = None,
        ignore: list[str] | None = None,
    ) -> dict[str, int]:
        from kdtoolkit.foundation import CheckpointError, load_external_state_dict

        full_shapes, head_keys = self._reference_keys(kwargs)
        try:
            state, remapped = to_timm_layout(load_external_state_dict(path), full_shapes, rename=rename, ignore=ignore)
        except ValueError as exc:
            raise CheckpointError(f"weights_rename: {exc}", source=str(path)) from None
        if remapped["converted"]:
            log.info("%s: %d keys of torchvision's layout renamed to timm's", path, remapped["converted"])
        own = self.body.state_dict()
        # own key -> key in the file's (complete model's) layout
        mapping = {}
        for k in own:
            mapping[k] = next((c for c in self._candidates(k) if c in full_shapes), k)
        missing = sorted(f for k, f in mapping.items() if f not in state and f not in head_keys)
        unexpected = sorted(k for k in state if k not in full_shapes)
        shape = sorted(
            f
            for k, f in mapping.items()
            if f in state and tuple(state[f].shape) != tuple(own[k].shape) and f not in head_keys
        )
        head_skipped = [
            f
            for k, f in mapping.items()
            if f in head_keys and (f not in state or tuple(state[f].shape) != tuple(own[k].shape))
        ]
        fits = {k: state[f] for k, f in mapping.items() if f in state and tuple(state[f].shape) == tuple(own[k].shape)}
        used = set(mapping.values())
        ignored = [k for k in state if k in full_shapes and k not in used]
        report = {
            "loaded": len(fits),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "shape": len(shape),
            "ignored": len(ignored),
            "dropped": remapped["dropped"],
            "converted": remapped["converted"],
        }
        if missing or unexpected or shape:
            counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} with another shape"
            if strict:
                details = _mismatch_details(missing, unexpected, shape, state, own, mapping, bool(fits))
                raise CheckpointError(
                    f"weights do not fit timm model '{self.model_name}' ({counts}; {details}); "
                    "strict = false loads what fits",
                    source=str(path),
                )
            log.warning(
                "%s: loaded %d of %d tensors into timm model '%s' (%s)",
                path,
                len(fits),
                len(own),
                self.model_name,
                counts,
            )
        if head_skipped:
            log.warning(
                "%s: classifier of timm model '%s' left at its initialisation (%d tensors absent or "
                "for another number of classes)",
                path,
                self.model_name,
                len(head_skipped),
            )
        self.body.load_state_dict(fits, strict=False)
        return report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier:
            return self.body(x)
        return self.body(x)[-1]


def _mismatch_details(
    missing: list[str],
    unexpected: list[str],
    shape: list[str],
    state: dict,
    own: dict,
    mapping: dict[str, str],
    any_fits: bool,
) -> str:
    """The first offending names of each kind and the likely cause, for the one-line strict-load error."""
    details = []
    if missing:
        details.append("missing: " + _first(missing))
    if unexpected:
        details.append("unexpected: " + _first(unexpected))
    if shape:
        f = shape[0]
        own_key = next(k for k, v in mapping.items() if v == f)
        details.append(f"shape of {f}: {tuple(state[f].shape)} in the file, {tuple(own[own_key].shape)} in the model")
    if not any_fits:
        cause = "no key fits: weights of a different model"
    elif missing or unexpected:
        cause = "likely weights of another architecture or depth"
    else:
        cause = "likely another width or variant of this architecture"
    return "; ".join(details) + "; " + cause


def _first(names: list[str], n: int = 3) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
