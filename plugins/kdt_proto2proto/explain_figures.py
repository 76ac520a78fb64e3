"""The layouts of ``kdt explain``'s figures, drawn on :class:`kdt_prototypes.sheet.Sheet` canvases.

Every function takes what to show (images as ``[S, S, 3]`` arrays in
``[0, 1]``, boxes, text) and writes one PNG whose size follows from the
number of entries and the tile side (:func:`kdt_prototypes.sheet.tile_scale`);
it returns the ``(width, height)`` in pixels.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdt_prototypes.explain import PrototypeView, heat_overlay
from kdt_prototypes.sheet import CYAN, FONT, GAP, LINE, RED, YELLOW, Sheet, boxed_tile, crop_tile, tile_scale, zoom

MARGIN = 12
TITLE = 24  # pixels of the bold title line
CHAR = 7.2  # pixels per character of FONT-point text, for wrapping


def wrap(text: str, width_px: int) -> list[str]:
    """``text`` wrapped to lines of at most ``width_px`` pixels of :data:`FONT`-point text."""
    return textwrap.wrap(text, max(20, int(width_px / CHAR))) or [""]


def prototype_tiles(view: PrototypeView, scale: int) -> list[np.ndarray]:
    """A prototype's three tiles: its training patch (the high-activation box, zoomed), its source
    image with the receptive-field (cyan) and high-activation (yellow) boxes, and the heat map."""
    side = view.image.shape[0] * scale
    boxes = ([(view.rf_box, CYAN)] if view.rf_box is not None else []) + [(view.box, YELLOW)]
    return [
        crop_tile(view.image, view.box, side),
        boxed_tile(view.image, scale, boxes),
        zoom(heat_overlay(view.image, view.up), scale),
    ]


def _header(sheet: Sheet, title: str, lines: list[str]) -> int:
    sheet.text(MARGIN, MARGIN, title, size=FONT + 3, bold=True)
    y = MARGIN + TITLE
    for line in lines:
        sheet.text(y, MARGIN, line)
        y += LINE
    return y + GAP


def _header_lines(lines: list[str], width: int) -> list[str]:
    return [w for line in lines for w in wrap(line, width - 2 * MARGIN)]


def gallery_figure(
    views: list[PrototypeView],
    labels: list[tuple[str, str]],
    title: str,
    legend: list[str],
    footer: list[str],
    path: Path,
    per_row: int = 4,
) -> tuple[int, int]:
    """Prototypes, ``per_row`` a row: a bold label, a detail line (the flags in red for a flagged
    prototype, which also gets a red frame) and :func:`prototype_tiles`."""
    scale = tile_scale(views[0].image.shape[0])
    side = views[0].image.shape[0] * scale
    entry_w, entry_h = 3 * side + 2 * GAP, 2 * LINE + side
    cell_w, cell_h = entry_w + 4 * GAP, entry_h + 3 * GAP
    cols = max(1, min(per_row, len(views)))
    rows = -(-len(views) // cols)
    width = 2 * MARGIN + cols * cell_w
    head = _header_lines(legend, width)
    foot = _header_lines(footer, width)
    top = MARGIN + TITLE + len(head) * LINE + GAP
    height = top + rows * cell_h + len(foot) * LINE + MARGIN
    sheet = Sheet(width, height)
    _header(sheet, title, head)
    for n, (view, (bold, detail)) in enumerate(zip(views, labels)):
        y, x = top + (n // cols) * cell_h, MARGIN + (n % cols) * cell_w
        sheet.text(y, x, bold, bold=True)
        flagged = bool(view.flags)
        sheet.text(
            y + LINE,
            x,
            ("FLAGGED: " + ", ".join(view.flags)) if flagged else detail,
            color=RED if flagged else "dimgray",
        )
        for k, tile in enumerate(prototype_tiles(view, scale)):
            sheet.paste(y + 2 * LINE, x + k * (side + GAP), tile)
        if flagged:
            sheet.frame(y + 2 * LINE, x, side, entry_w, RED)
    y = top + rows * cell_h
    for line in foot:
        sheet.text(y, MARGIN, line, color=RED if foot and line.startswith("flagged") else "black")
        y += LINE
    sheet.save(path)
    return width, height


@dataclass
class Row:
    """One row of :func:`rows_figure`: tiles left to right, then lines of text
    ``(text, colour, bold)``; ``frame``: a colour to frame the tiles with, or ``None``."""

    tiles: list[np.ndarray]
    lines: list[tuple[str, str | tuple, bool]] = field(default_factory=list)
    frame: tuple | None = None


def rows_figure(
    title: str,
    header: list[str],
    image: np.ndarray,
    image_lines: list[tuple[str, str | tuple, bool]],
    captions: list[str],
    rows: list[Row],
    path: Path,
    text_width: int = 380,
) -> tuple[int, int]:
    """A figure of rows: first the input ``image`` with ``image_lines`` beside it, then column
    ``captions`` and one :class:`Row` each (a local explanation, a decision path)."""
    scale = tile_scale(image.shape[0])
    side = image.shape[0] * scale
    ntiles = max([len(r.tiles) for r in rows] + [1])
    width = 2 * MARGIN + ntiles * (side + GAP) + text_width
    head = _header_lines(header, width)
    row_h = [max(side, len(r.lines) * LINE) + 2 * GAP for r in rows]
    top = MARGIN + TITLE + len(head) * LINE + GAP
    height = top + side + 2 * GAP + LINE + sum(row_h) + MARGIN
    sheet = Sheet(width, height)
    _header(sheet, title, head)
    sheet.paste(top, MARGIN, zoom(image, scale))
    for k, (text, color, bold) in enumerate(image_lines):
        sheet.text(top + k * LINE, MARGIN + side + 2 * GAP, text, color=color, bold=bold)
    y = top + side + 2 * GAP
    for k, caption in enumerate(captions):
        sheet.text(y, MARGIN + k * (side + GAP) + side / 2, caption, size=FONT - 1, ha="center", color="dimgray")
    y += LINE
    for row, h in zip(rows, row_h):
        for k, tile in enumerate(row.tiles):
            sheet.paste(y + GAP, MARGIN + k * (side + GAP), tile)
        if row.frame is not None:
            sheet.frame(y + GAP, MARGIN, side, len(row.tiles) * (side + GAP) - GAP, row.frame, thickness=2)
        for k, (text, color, bold) in enumerate(row.lines):
            sheet.text(y + GAP + k * LINE, MARGIN + ntiles * (side + GAP) + GAP, text, color=color, bold=bold)
        y += h
    sheet.save(path)
    return width, height


@dataclass
class Column:
    """One model of :func:`compare_figure`: header lines, then per prototype two label lines and two tiles."""

    header: list[tuple[str, str | tuple, bool]]
    entries: list[tuple[str, str, list[np.ndarray]]]


def compare_figure(
    title: str, legend: list[str], image: np.ndarray, image_lines: list[str], columns: list[Column], path: Path
) -> tuple[int, int]:
    """Models side by side for one input: the input image in the first column, then one
    :class:`Column` per model (its most active prototypes: where each fires, and its training patch)."""
    scale = tile_scale(image.shape[0])
    side = image.shape[0] * scale
    col_w = 2 * side + GAP + 4 * GAP
    width = 2 * MARGIN + (side + 4 * GAP) + len(columns) * col_w
    head = _header_lines(legend, width)
    nhead = max(len(c.header) for c in columns)
    nrows = max(len(c.entries) for c in columns)
    top = MARGIN + TITLE + len(head) * LINE + GAP
    height = top + (nhead + 1) * LINE + nrows * (2 * LINE + side + 2 * GAP) + MARGIN
    sheet = Sheet(width, height)
    _header(sheet, title, head)
    y0 = top + (nhead + 1) * LINE
    sheet.paste(y0 + 2 * LINE, MARGIN, zoom(image, scale))
    for k, line in enumerate(image_lines):
        sheet.text(y0 + 2 * LINE + side + GAP + k * LINE, MARGIN, line)
    for c, col in enumerate(columns):
        x = MARGIN + side + 4 * GAP + c * col_w
        for k, (text, color, bold) in enumerate(col.header):
            sheet.text(top + k * LINE, x, text, color=color, bold=bold)
        for r, (label, detail, tiles) in enumerate(col.entries):
            y = y0 + r * (2 * LINE + side + 2 * GAP)
            sheet.text(y, x, label, bold=True)
            sheet.text(y + LINE, x, detail, color="dimgray")
            for k, tile in enumerate(tiles):
                sheet.paste(y + 2 * LINE, x + k * (side + GAP), tile)
    sheet.save(path)
    return width, height


def pairs_figure(
    title: str,
    legend: list[str],
    best: list[tuple[list[str], list[np.ndarray]]],
    worst: list[tuple[list[str], list[np.ndarray]]],
    caption: list[str],
    path: Path,
) -> tuple[int, int]:
    """Matched prototype pairs: the best pairs on the left, the worst on the right; each pair two
    label lines and four tiles (teacher source, teacher patch, student patch, student source)."""
    tiles = (best or worst)[0][1]
    side = tiles[0].shape[0]
    col_w = 4 * side + 5 * GAP + 6 * GAP  # a wider gap between the teacher's two tiles and the student's
    width = 2 * MARGIN + 2 * col_w
    head = _header_lines(legend, width)
    foot = _header_lines(caption, width)
    nrows = max(len(best), len(worst))
    pair_h = 2 * LINE + side + 2 * GAP
    top = MARGIN + TITLE + len(head) * LINE + GAP
    height = top + LINE + GAP + nrows * pair_h + GAP + len(foot) * LINE + MARGIN
    sheet = Sheet(width, height)
    _header(sheet, title, head)
    for c, (name, pairs) in enumerate((("best-matched pairs", best), ("worst-matched pairs", worst))):
        x = MARGIN + c * col_w
        sheet.text(top, x, f"{name} ({len(pairs)})", bold=True, size=FONT + 1)
        for r, (lines, row_tiles) in enumerate(pairs):
            y = top + LINE + GAP + r * pair_h
            for k, line in enumerate(lines[:2]):
                sheet.text(y + k * LINE, x, line, bold=k == 0)
            for k, tile in enumerate(row_tiles):
                sheet.paste(y + 2 * LINE, x + k * (side + GAP) + (2 * GAP if k >= 2 else 0), tile)
    y = top + LINE + GAP + nrows * pair_h + GAP
    for line in foot:
        sheet.text(y, MARGIN, line)
        y += LINE
    sheet.save(path)
    return width, height
