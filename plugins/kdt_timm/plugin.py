"""Any timm model as a backbone, cut at a chosen stage.

Uses timm's ``features_only`` mode and ``feature_info`` (channels and stride
of every stage) rather than hand-written wrappers. Weights: random init
(default), timm's own pretrained loading (``pretrained = true``, needs
network on the user's machine) or a local file (``weights = "x.safetensors"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdtoolkit.hookspecs import hookimpl


class TimmBackbone(nn.Module):
    """A timm model as a feature extractor: images to the feature map of one stage.

    :param model: a timm model name (``resnet18``, ``resnet50``, ``vgg11``,
        ``densenet121``, ...); ``timm.list_models()`` lists them.
    :param out_index: which feature stage to return, as an index into timm's
        ``feature_info`` (``-1``: the last, stride 32 for ResNets; ``2`` is
        stride 8 and ``3`` stride 16).
    :param pretrained: load timm's pretrained weights (downloads on first use;
        never in tests).
    :param weights: load weights from this local ``.safetensors`` (or
        ``.pth``/``.bin``) file instead, through timm's own loader.
    :param drop_path_rate: stochastic depth rate, for models that support it.
    """

    def __init__(self, *, model: str, out_index: int = -1, pretrained: bool = False, weights: Path | None = None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        import timm

        kwargs = {}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if weights is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        probe = timm.create_model(model, pretrained=False, features_only=True, **kwargs)
        n = len(probe.feature_info)
        index = out_index if out_index >= 0 else n + out_index
        del probe
        try:
            self.body = timm.create_model(model, pretrained=pretrained or weights is not None, features_only=True,
                                          out_indices=(index,), **kwargs)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            if weights is None:
                raise
            from kdtoolkit.errors import CheckpointError

            raise CheckpointError(f"cannot load these weights into timm model '{model}': {' '.join(str(exc).split())[:200]}",
                                  source=str(weights)) from None
        self.out_channels = int(self.body.feature_info.channels()[-1])
        self.reduction = int(self.body.feature_info.reduction()[-1])
        self.model_name = model

    @staticmethod
    def check_params(params: dict) -> None:
        """Validation before anything is built: the model exists, the stage too."""
        import timm

        name = params["model"]
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError("model", f"unknown timm model {name!r}{hint}")
        if params.get("pretrained") and params.get("weights"):
            raise ValueError("weights", "set either pretrained = true or weights, not both")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


@hookimpl
def kdt_register_backbones(registry):
    registry.add("timm", TimmBackbone)
