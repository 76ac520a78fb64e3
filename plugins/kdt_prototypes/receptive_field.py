"""Receptive fields of latent patches, by ProtoPNet's formula (method notes §1, "Explanation").

A latent location ``(h, w)`` of the prototype layer sees a square of input
pixels. ProtoPNet computes it from the list of the backbone's layers on the
main path (kernel size, stride, padding), layer by layer, as the quadruple
``[n, j, r, start]``: the grid size, the jump (input pixels between two
neighbouring locations), the receptive-field size and the centre of the first
location's field, starting from ``[img_size, 1, 1, 0.5]``:

- ``pad = 2·padding`` (or TensorFlow-style ``SAME``/``VALID`` padding),
  ``pL = ⌊pad / 2⌋``;
- ``n' = ⌊(n − k + pad) / s⌋ + 1``, ``j' = j·s``, ``r' = r + (k − 1)·j``,
  ``start' = start + ((k − 1)/2 − pL)·j``;

and the prototype layer itself (kernel 1, stride 1, ``VALID``). The field of
location ``(h, w)`` is centred at ``start + h·j`` (rows) and ``start + w·j``
(columns); its pixel range is ``[max(int(c − r/2), 0), min(int(c + r/2),
img_size))``. Written from ProtoPNet's definitions; no code of it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "SHORTCUT_NAMES",
    "RFInfo",
    "layer_rf_info",
    "proto_layer_rf_info",
    "rf_box",
    "backbone_layers",
    "model_rf_info",
]

#: Child-module names of residual shortcuts, which run in parallel with the
#: main path and are left out of the layer list (ProtoPNet lists the main path only).
SHORTCUT_NAMES = ("downsample", "shortcut", "skip")


@dataclass(frozen=True)
class RFInfo:
    """ProtoPNet's receptive-field quadruple of a layer.

    :ivar n: grid size (locations per side).
    :ivar j: jump: input pixels between neighbouring locations.
    :ivar r: receptive-field size in input pixels.
    :ivar start: centre of the first location's field (input pixel coordinates).
    """

    n: int
    j: float
    r: float
    start: float


def layer_rf_info(kernel: int, stride: int, padding: int | str, prev: RFInfo) -> RFInfo:
    """The quadruple after one layer (``padding``: an int per side, ``"SAME"`` or ``"VALID"``)."""
    if padding == "SAME":
        n_out = math.ceil(prev.n / stride)
        pad = max(kernel - stride, 0) if prev.n % stride == 0 else max(kernel - prev.n % stride, 0)
    elif padding == "VALID":
        n_out = math.ceil((prev.n - kernel + 1) / stride)
        pad = 0
    else:
        pad = 2 * int(padding)
        n_out = math.floor((prev.n - kernel + pad) / stride) + 1
    left = math.floor(pad / 2)
    return RFInfo(
        n=n_out,
        j=prev.j * stride,
        r=prev.r + (kernel - 1) * prev.j,
        start=prev.start + ((kernel - 1) / 2 - left) * prev.j,
    )


def proto_layer_rf_info(
    img_size: int, kernels: list[int], strides: list[int], paddings: list[int | str], prototype_kernel: int = 1
) -> RFInfo:
    """The prototype layer's quadruple for a backbone given as its main-path layer list.

    :param img_size: side of the (square) input image in pixels.
    :param kernels: kernel size of each layer, in forward order.
    :param strides: stride of each layer.
    :param paddings: padding per side of each layer (``"SAME"``/``"VALID"`` allowed).
    :param prototype_kernel: the prototypes' spatial size (1 for 1×1 prototypes).
    """
    if not len(kernels) == len(strides) == len(paddings):
        raise ValueError(
            f"kernels, strides and paddings differ in length: {len(kernels)}, {len(strides)}, {len(paddings)}"
        )
    info = RFInfo(n=int(img_size), j=1, r=1, start=0.5)
    for k, s, p in zip(kernels, strides, paddings):
        info = layer_rf_info(int(k), int(s), p, info)
    return layer_rf_info(prototype_kernel, 1, "VALID", info)


def rf_box(img_size: int, h: int, w: int, info: RFInfo) -> tuple[int, int, int, int]:
    """The receptive field of latent location ``(h, w)`` as ``(top, left, bottom, right)``, inclusive.

    ProtoPNet's range is ``[max(int(c − r/2), 0), min(int(c + r/2), img_size))``
    per axis (end exclusive); here the end is made inclusive (``− 1``), the
    convention of every box of this bundle.
    """

    def span(i: int) -> tuple[int, int]:
        centre = info.start + i * info.j
        return max(int(centre - info.r / 2), 0), min(int(centre + info.r / 2), int(img_size)) - 1

    top, bottom = span(int(h))
    left, right = span(int(w))
    return top, left, bottom, right


def _first(value) -> int | str:
    if isinstance(value, str):
        return value.upper()
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def backbone_layers(backbone, image_size: int) -> tuple[list[int], list[int], list[int | str]]:
    """The main-path layer list of ``backbone``: kernel sizes, strides and paddings, in forward order.

    Found by one forward pass of a ``[1, 3, S, S]`` zero image with hooks on
    every convolution and pooling module (``Conv2d``, ``MaxPool2d``,
    ``AvgPool2d``), so the order is the order of execution. Modules inside a
    child named as in :data:`SHORTCUT_NAMES` (residual shortcuts, parallel to
    the main path) are left out. The kernel is the effective one,
    ``dilation·(k − 1) + 1``; timm's TensorFlow-style "same" layers count as
    ``SAME``. Square kernels and strides are assumed (the first dimension is used).

    :param backbone: an ``nn.Module`` mapping images to feature maps.
    :param image_size: the side S of the input images.
    """
    import torch
    from torch import nn

    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    layers: list[tuple[int, int, int | str]] = []
    hooks = []

    def record(module, *_):
        dilation = int(_first(getattr(module, "dilation", 1))) if not isinstance(module, nn.AvgPool2d) else 1
        kernel = dilation * (int(_first(module.kernel_size)) - 1) + 1
        padding = "SAME" if "Same" in type(module).__name__ else _first(module.padding)
        layers.append((kernel, int(_first(module.stride)), padding))

    for name, module in backbone.named_modules():
        if isinstance(module, kinds) and not set(name.split(".")) & set(SHORTCUT_NAMES):
            hooks.append(module.register_forward_hook(record))
    was_training = backbone.training
    try:
        backbone.eval()
        param = next(backbone.parameters(), None)
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=param.device if param is not None else "cpu"))
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return [k for k, _, _ in layers], [s for _, s, _ in layers], [p for _, _, p in layers]


def model_rf_info(model, image_size: int) -> RFInfo:
    """The prototype layer's receptive-field quadruple of a ``Model``.

    The model is a backbone and a prototype head with 1×1 prototypes.
    """
    kernels, strides, paddings = backbone_layers(model.backbone, image_size)
    return proto_layer_rf_info(image_size, kernels, strides, paddings, 1)
