"""Figures laid out in pixels: image tiles, boxes and text on a white canvas, saved 1:1.

A :class:`Sheet` is a canvas of known size; tiles are pasted at pixel
positions, boxes drawn into the pixels, and text placed at pixel positions.
:meth:`Sheet.save` writes a PNG of exactly ``width × height`` pixels, so
text set at :data:`FONT` points (100 dpi) is legible at 100% zoom and a
layout's size is known before it is drawn. Small images are enlarged by an
integer factor (nearest neighbour) to at least :data:`TILE` pixels a side.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdtoolkit.foundation import atomic_savefig

__all__ = [
    "TILE",
    "FONT",
    "LINE",
    "GAP",
    "DPI",
    "YELLOW",
    "CYAN",
    "RED",
    "GREEN",
    "tile_scale",
    "zoom",
    "draw_box",
    "boxed_tile",
    "crop_tile",
    "fit",
    "Sheet",
]

#: Smallest tile side in pixels; smaller images are enlarged by an integer factor.
TILE = 128
#: Font size in points (at 100 dpi, 1 pt = 1.39 px) and the height of a text line in pixels.
FONT = 9
LINE = 16
#: Space between tiles, in pixels.
GAP = 6
DPI = 100

YELLOW = (1.0, 0.9, 0.0)
CYAN = (0.0, 0.85, 1.0)
RED = (0.85, 0.0, 0.0)
GREEN = (0.0, 0.55, 0.0)


def tile_scale(size: int) -> int:
    """The integer enlargement of an image of side ``size``: at least :data:`TILE` pixels a side."""
    return max(1, math.ceil(TILE / max(1, int(size))))


def zoom(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` ``[h, w, 3]`` enlarged ``scale`` times (nearest neighbour)."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def draw_box(tile: np.ndarray, box: tuple[int, int, int, int], scale: int, color, thickness: int = 2) -> np.ndarray:
    """Draw ``box`` (source pixels, ``(top, left, bottom, right)`` inclusive) into a tile enlarged ``scale`` times."""
    top, left, bottom, right = (int(v) for v in box)
    y0, x0, y1, x1 = top * scale, left * scale, (bottom + 1) * scale - 1, (right + 1) * scale - 1
    t = max(1, min(thickness, (y1 - y0 + 1) // 2, (x1 - x0 + 1) // 2))
    c = np.asarray(color, dtype=tile.dtype)
    tile[y0 : y0 + t, x0 : x1 + 1] = c
    tile[y1 - t + 1 : y1 + 1, x0 : x1 + 1] = c
    tile[y0 : y1 + 1, x0 : x0 + t] = c
    tile[y0 : y1 + 1, x1 - t + 1 : x1 + 1] = c
    return tile


def boxed_tile(image: np.ndarray, scale: int, boxes: list[tuple[tuple[int, int, int, int], tuple]]) -> np.ndarray:
    """``image`` enlarged ``scale`` times with ``(box, colour)`` pairs drawn in order."""
    tile = zoom(image, scale).copy()
    for box, color in boxes:
        draw_box(tile, box, scale, color)
    return tile


def crop_tile(image: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """The ``box`` region of ``image`` enlarged (nearest neighbour) to fit a ``side × side`` white tile, centred."""
    top, left, bottom, right = box
    patch = image[top : bottom + 1, left : right + 1]
    h, w = patch.shape[:2]
    f = side / max(h, w)
    nh, nw = max(1, int(h * f)), max(1, int(w * f))
    rows = np.minimum((np.arange(nh) / f).astype(int), h - 1)
    cols = np.minimum((np.arange(nw) / f).astype(int), w - 1)
    tile = np.ones((side, side, 3), dtype=np.float64)
    y, x = (side - nh) // 2, (side - nw) // 2
    tile[y : y + nh, x : x + nw] = patch[rows][:, cols]
    return tile


def fit(tile: np.ndarray, side: int) -> np.ndarray:
    """``tile`` scaled (nearest neighbour) into a ``side × side`` tile, unless it is one already."""
    if tile.shape[0] == side and tile.shape[1] == side:
        return tile
    return crop_tile(tile, (0, 0, tile.shape[0] - 1, tile.shape[1] - 1), side)


class Sheet:
    """A white canvas of ``width × height`` pixels with tiles and text.

    :param width: pixels.
    :param height: pixels.
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = int(width), int(height)
        self.canvas = np.ones((self.height, self.width, 3), dtype=np.float64)
        self.texts: list[tuple[float, float, str, dict]] = []

    def paste(self, y: int, x: int, tile: np.ndarray) -> None:
        """Put ``tile`` ``[h, w, 3]`` (values in ``[0, 1]``) with its top-left corner at ``(y, x)``."""
        h, w = tile.shape[:2]
        self.canvas[y : y + h, x : x + w] = tile[: self.height - y, : self.width - x]

    def frame(self, y: int, x: int, h: int, w: int, color, thickness: int = 3) -> None:
        """A rectangle outline around the region ``h × w`` at ``(y, x)`` (drawn just outside it)."""
        y0, x0 = max(0, y - thickness), max(0, x - thickness)
        y1, x1 = min(self.height, y + h + thickness), min(self.width, x + w + thickness)
        c = np.asarray(color)
        self.canvas[y0:y, x0:x1] = c
        self.canvas[y + h : y1, x0:x1] = c
        self.canvas[y0:y1, x0:x] = c
        self.canvas[y0:y1, x + w : x1] = c

    def text(
        self, y: float, x: float, s: str, *, size: float = FONT, color="black", bold: bool = False, ha: str = "left"
    ) -> None:
        """Text with its top at pixel row ``y``, starting (``ha="left"``) or centred at column ``x``."""
        self.texts.append(
            (
                x,
                y,
                s,
                {"fontsize": size, "color": color, "fontweight": "bold" if bold else "normal", "ha": ha, "va": "top"},
            )
        )

    def save(self, path: Path) -> Path:
        """Write the PNG (exactly ``width × height`` pixels) and return ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(self.canvas, interpolation="nearest", extent=(0, self.width, self.height, 0))
        ax.set_xlim(0, self.width)
        ax.set_ylim(self.height, 0)
        ax.axis("off")
        for x, y, s, kw in self.texts:
            ax.text(x, y, s, clip_on=True, **kw)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savefig(fig, path, dpi=DPI)
        plt.close(fig)
        return path
