"""ProtoPNet's training augmentation, online: one of rotate, skew, shear, distort, then a 50% flip.

ProtoPNet (and Proto2Proto after it) augmented the training set offline with
the Augmentor library: four pipelines (``rotate``, ``skew``, ``shear``,
``random_distortion``), each followed by a left-right flip of probability
0.5, each run 10 times over every training image — 40 augmented copies per
image, written to disk and trained on without further augmentation.  A
sample of that pooled folder is one of the four operations, each equally
likely, with its random parameters, then maybe flipped.  This module draws
exactly that, on the fly, so nothing has to be multiplied on disk
(``kdt prepare`` still writes the offline copies: :mod:`kdt_data.prepare`).

Every operation takes and returns a PIL image of the same size and mode
(``RGB`` or ``L``) and draws its random numbers from a
:class:`torch.Generator` (``None``: torch's global RNG, which the trainer
and its DataLoader workers seed, so runs repeat).  Rotation, skew, shear,
crop, resize and flip are ``torchvision.transforms.v2.functional`` calls;
the distortion is Pillow's mesh transform, the one Augmentor uses.  Like
Augmentor's, no operation brings in pixels from outside the image: rotation
and shear crop the largest fill-free rectangle and resize it back, the skew
moves corners outwards, the distortion keeps the border fixed.

Where the online operations differ from Augmentor 0.2.12 (the facts, in
Augmentor's terms):

- Resampling is bilinear throughout; Augmentor's is bicubic, which takes
  about three times as long in Pillow's geometric transforms.
- ``rotate(max_left_rotation=15, max_right_rotation=15)``: Augmentor draws an
  integer angle (left or right with equal odds, so 0° twice as often as any
  other), rotates with canvas expansion, crops a rectangle computed by a
  formula that is not the largest one of the image's aspect ratio (at 15° it
  keeps 168 × 158 of a 224 × 224 image and 396 × 252 of a 500 × 400 one,
  stretched when resized back) and resizes it to the input size.  Here: a
  uniform real angle in [-15°, 15°], the largest centred rectangle of the
  input's aspect ratio (182 × 182 and 387 × 310 in those cases), resized
  back.
- ``skew(magnitude=0.2)`` (skew type ``RANDOM``): the same draw — an integer
  amount in [1, ceil(0.2 · max(w, h))] pixels, then a tilt (left, right,
  forward, backward) or one of 8 corner moves, chosen as Augmentor chooses
  them — and the same perspective transform (v2 ``perspective`` with
  Augmentor's corner points).  torchvision's ``RandomPerspective`` is a
  different family: it moves every corner *inwards* by a random amount and
  fills the uncovered area, so it is not used.
- ``shear(max_shear_left=10, max_shear_right=10)``: Augmentor's integer angle
  draw is off by its rounding (angles −9° … 11°, never 0°; ±1° twice as
  likely); here a uniform real angle in [-10°, 10°] along x or y (equal odds),
  v2 ``affine(shear=...)`` about the centre, then, as Augmentor does, the
  fill-free band (width ``w − |tan φ|·h`` for an x shear) resized back to the
  input size.
- ``random_distortion(grid_width=5, grid_height=5, magnitude=5)``: the same
  model and draw — the 16 inner vertices of a 5 × 5 grid of tiles (the last
  tile of a row or column takes the remainder) each moved by an integer
  (dx, dy) in [-5, 5]² *pixels of the image given* (so the distortion is
  relatively weaker on larger images, as it was), the border fixed, one
  quad-to-rectangle map per tile.  torchvision's ``ElasticTransform`` (a
  smoothed random field with its own ``alpha`` and ``sigma``) is a different
  distortion and is not used.
- ``flip_left_right(probability=0.5)``: Augmentor applies an operation when
  ``round(uniform(0, 1), 1) <= probability``, i.e. with probability 0.55 for
  0.5; here 0.5.

The ProtoPNet repository's own script ran only the first three pipelines (its
distortion was commented out, 30 copies per image); Proto2Proto's scripts for
CUB-200 and Stanford Cars ran all four: ``ops`` selects the set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "OPS",
    "AUGMENTATIONS",
    "Augmentation",
    "build_augmentation",
    "apply_op",
    "rotate",
    "skew",
    "shear",
    "distort",
    "hflip",
]

#: The operations of ProtoPNet's augmentation, in the order of the original script.
OPS = ("rotate", "skew", "shear", "distort")
#: Names :func:`build_augmentation` accepts.
AUGMENTATIONS = ("protopnet", "flip", "none")

# Corner order: top-left, top-right, bottom-right, bottom-left; outward direction of each corner.
_OUTWARD = ((-1, -1), (1, -1), (1, 1), (-1, 1))
# Augmentor's four tilts: (corner, moved along x?) pairs.
_TILTS = (
    ((0, False), (3, False)),  # left: the left edge grows up and down
    ((1, False), (2, False)),  # right
    ((0, True), (1, True)),  # forward: the top edge grows left and right
    ((2, True), (3, True)),
)  # backward


def _uniform(lo: float, hi: float, generator) -> float:
    import torch

    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator) -> int:
    """An integer in [lo, hi], both included."""
    import torch

    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _interpolation():
    from torchvision.transforms.v2 import InterpolationMode

    return InterpolationMode.BILINEAR


def _crop_resize_back(img, crop_w: int, crop_h: int, size: tuple[int, int]):
    """The centred ``crop_w × crop_h`` rectangle of ``img``, resized to ``size`` (w, h)."""
    from torchvision.transforms.v2 import functional as F

    w, h = size
    img = F.center_crop(img, [max(1, crop_h), max(1, crop_w)])
    return F.resize(img, [h, w], interpolation=_interpolation(), antialias=True)


def rotate(img: Any, generator: Any = None, max_degrees: float = 15.0) -> Any:
    """Rotate by a uniform angle in [-max_degrees, max_degrees], keep the largest inner rectangle.

    Parameters:
        img: a PIL image.
        generator: a torch.Generator, or None for torch's global RNG.
        max_degrees: largest rotation either way, in degrees.
    """
    from torchvision.transforms.v2 import functional as F

    angle = _uniform(-max_degrees, max_degrees, generator)
    w, h = img.size
    out = F.rotate(img, angle, interpolation=_interpolation(), expand=True)
    c, s = math.cos(math.radians(abs(angle))), math.sin(math.radians(abs(angle)))
    a = min(w / (w * c + h * s), h / (w * s + h * c))  # largest scale of a w:h rectangle inside
    return _crop_resize_back(out, int(w * a), int(h * a), (w, h))


def _skew_corners(w: int, h: int, magnitude: float, generator) -> list[list[int]]:
    """Augmentor's ``RANDOM`` skew: where the four corners of the image go (outwards)."""
    amount = _randint(1, max(1, math.ceil(max(w, h) * magnitude)), generator)
    corners = [[0, 0], [w, 0], [w, h], [0, h]]
    kind = _randint(0, 3, generator)  # Augmentor's TILT, TILT_LEFT_RIGHT, TILT_TOP_BOTTOM, CORNER
    moves: tuple[tuple[int, bool], ...]
    if kind == 3:
        k = _randint(0, 7, generator)
        moves = ((k // 2, k % 2 == 0),)  # even: the corner moves along x, odd: along y
    else:
        lo, hi = ((0, 3), (0, 1), (2, 3))[kind]
        moves = _TILTS[_randint(lo, hi, generator)]
    for corner, along_x in moves:
        axis = 0 if along_x else 1
        corners[corner][axis] += _OUTWARD[corner][axis] * amount
    return corners


def skew(img: Any, generator: Any = None, magnitude: float = 0.2) -> Any:
    """Augmentor's random perspective skew: one edge or one corner pulled outwards by up to
    ``magnitude`` × the longer side.

    Parameters:
        img: a PIL image.
        generator: a torch.Generator, or None for torch's global RNG.
        magnitude: largest corner displacement as a fraction of the longer side (Augmentor's magnitude).
    """
    from torchvision.transforms.v2 import functional as F

    w, h = img.size
    corners = _skew_corners(w, h, magnitude, generator)
    return F.perspective(img, [[0, 0], [w, 0], [w, h], [0, h]], corners, interpolation=_interpolation())


def shear(img: Any, generator: Any = None, max_degrees: float = 10.0) -> Any:
    """Shear along x or y by a uniform angle in [-max_degrees, max_degrees], keep the fill-free band.

    Parameters:
        img: a PIL image.
        generator: a torch.Generator, or None for torch's global RNG.
        max_degrees: largest shear angle either way, in degrees.
    """
    from torchvision.transforms.v2 import functional as F

    angle = _uniform(-max_degrees, max_degrees, generator)
    along_x = _randint(0, 1, generator) == 0
    w, h = img.size
    t = abs(math.tan(math.radians(angle)))
    shear_xy = [angle, 0.0] if along_x else [0.0, angle]
    out = F.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear_xy, interpolation=_interpolation())
    if along_x:
        return _crop_resize_back(out, int(w - t * h), h, (w, h))
    return _crop_resize_back(out, w, int(h - t * w), (w, h))


def _knots(n: int, tiles: int) -> list[int]:
    """Augmentor's grid lines along a side of ``n`` pixels: equal tiles, the last one takes the rest."""
    step = n // tiles
    return [i * step for i in range(tiles)] + [n]


def distort(img: Any, generator: Any = None, grid: int = 5, magnitude: int = 5) -> Any:
    """Augmentor's random distortion: the inner vertices of a ``grid`` × ``grid`` tiling moved by
    integers in [-magnitude, magnitude] pixels, the border fixed, bilinear inside each tile.

    Parameters:
        img: a PIL image.
        generator: a torch.Generator, or None for torch's global RNG.
        grid: tiles per side (Augmentor's grid_width = grid_height).
        magnitude: largest vertex move in pixels, either way, along each axis.
    """
    import torch
    from PIL import Image

    w, h = img.size
    moves = torch.randint(-magnitude, magnitude + 1, (grid - 1, grid - 1, 2), generator=generator).tolist()
    if w < grid or h < grid:
        return img.copy()
    xs, ys = _knots(w, grid), _knots(h, grid)

    def vertex(r: int, c: int) -> tuple[int, int]:  # where output vertex (r, c) samples the input
        if 0 < r < grid and 0 < c < grid:
            dx, dy = moves[r - 1][c - 1]
            return min(max(xs[c] + dx, 0), w), min(max(ys[r] + dy, 0), h)  # inside tiny images too
        return xs[c], ys[r]

    mesh = [
        (
            (xs[c], ys[r], xs[c + 1], ys[r + 1]),
            vertex(r, c) + vertex(r + 1, c) + vertex(r + 1, c + 1) + vertex(r, c + 1),
        )
        for r in range(grid)
        for c in range(grid)
    ]  # quads: top-left, bottom-left, bottom-right, top-right
    return img.transform(img.size, Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR)


def hflip(img: Any, generator: Any = None, p: float = 0.5) -> Any:
    """Flip left-right with probability ``p``.

    Parameters:
        img: a PIL image.
        generator: a torch.Generator, or None for torch's global RNG.
        p: probability of the flip.
    """
    from torchvision.transforms.v2 import functional as F

    return F.horizontal_flip(img) if _uniform(0.0, 1.0, generator) < p else img


_OP_FUNCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "rotate": rotate,
    "skew": skew,
    "shear": shear,
    "distort": distort,
}


def apply_op(img: Any, op: str, generator: Any = None) -> Any:
    """One of :data:`OPS` with ProtoPNet's parameters (no flip).

    Parameters:
        img: a PIL image.
        op: ``rotate``, ``skew``, ``shear`` or ``distort``.
        generator: a torch.Generator, or None for torch's global RNG.
    """
    if op not in _OP_FUNCTIONS:
        raise ValueError(f"unknown augmentation operation {op!r} (expected one of {', '.join(OPS)})")
    return _OP_FUNCTIONS[op](img, generator)


class Augmentation:
    """A picklable PIL-to-PIL augmentation: one of ``ops`` drawn uniformly (if any), then a flip of
    probability ``flip_p``.  Call it as ``aug(img)`` or ``aug(img, generator)``.

    Parameters:
        ops: operation names from :data:`OPS`; empty for none.
        flip_p: probability of the left-right flip that follows.
    """

    def __init__(self, ops: Sequence[str] = OPS, flip_p: float = 0.5):
        unknown = [op for op in ops if op not in _OP_FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown augmentation operation(s) {unknown} (expected some of {', '.join(OPS)})")
        self.ops = tuple(ops)
        self.flip_p = float(flip_p)

    def __call__(self, img: Any, generator: Any = None) -> Any:
        if self.ops:
            op = self.ops[_randint(0, len(self.ops) - 1, generator)] if len(self.ops) > 1 else self.ops[0]
            img = _OP_FUNCTIONS[op](img, generator)
        if self.flip_p > 0:
            img = hflip(img, generator, self.flip_p)
        return img

    def __repr__(self) -> str:
        return f"Augmentation(ops={self.ops}, flip_p={self.flip_p})"


def build_augmentation(name: str, ops: Sequence[str] | None = None) -> Augmentation:
    """A named PIL-to-PIL training augmentation.

    ``"protopnet"``: one of ``ops`` (default :data:`OPS`: rotate, skew, shear,
    distort), each equally likely, then a left-right flip with probability
    0.5 — a sample of ProtoPNet's offline-augmented training folder.
    ``"flip"``: the flip alone.  ``"none"``: the image unchanged.

    Parameters:
        name: ``protopnet``, ``flip`` or ``none``.
        ops: with ``protopnet``, the operations to draw from (e.g. ``("rotate", "skew", "shear")``,
            the ProtoPNet repository's own set).
    """
    if name == "protopnet":
        return Augmentation(OPS if ops is None else ops, 0.5)
    if name in ("flip", "none"):
        if ops:
            raise ValueError(f"augmentation {name!r} takes no operations")
        return Augmentation((), 0.5 if name == "flip" else 0.0)
    raise ValueError(f"unknown augmentation {name!r} (expected one of {', '.join(AUGMENTATIONS)})")
