"""Tables of results, rendered as Markdown (files, pipes) or with rich (terminals).

Light on purpose (no torch): commands that only list things print through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class Number(float):
    """A number that carries how it is shown: ``Number(0.9777, ".2%")`` is shown ``97.77%``.

    Table cells keep the number itself (so that reports over several runs can
    average them, see :mod:`kdtoolkit.results.aggregate`) instead of a formatted string.

    :param value: the number.
    :param spec: a :func:`format` specification (default ``".4f"``).
    """

    spec: str

    def __new__(cls, value: float, spec: str = ".4f") -> Number:
        obj = super().__new__(cls, value)
        obj.spec = spec
        return obj

    def __reduce__(self):
        return (Number, (float(self), self.spec))


@dataclass
class Table:
    """A titled table of strings/numbers, rendered as Markdown or with rich.

    :ivar title: the heading.
    :ivar columns: column names.
    :ivar rows: rows of cells (numbers are formatted with :func:`fmt`).
    :ivar note: a paragraph printed under the table.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    key: str = field(default="")

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_rich(self):
        """A rich table whose cells wrap (fold) rather than being cut with an ellipsis."""
        from rich.markup import escape
        from rich.table import Table as RichTable

        t = RichTable(title=escape(self.title), caption=escape(self.note) if self.note else None)
        for c in self.columns:
            t.add_column(escape(c), overflow="fold")
        for row in self.rows:  # cells are text, never rich markup ("[/opt/x]" in a path or an error)
            t.add_row(*[escape(fmt(c)) for c in row])
        return t


def print_tables(tables: list[Table], file=None, width: int | None = None) -> None:
    """Print tables for a person or a pipe: on a terminal as rich tables whose cells
    wrap to its width (never cut); otherwise (``kdt ... | cat``, a file) as plain
    Markdown, every cell in full.

    :param file: the stream (default ``sys.stdout``).
    :param width: the terminal's width in characters (default: detected).
    """
    import sys

    file = file if file is not None else sys.stdout
    if not (hasattr(file, "isatty") and file.isatty()):
        file.write("\n".join(t.to_markdown() for t in tables))
        file.flush()
        return
    from rich.console import Console

    console = Console(file=file, width=width)
    for t in tables:
        console.print(t.to_rich())


def fmt(value: Any) -> str:
    """Cells: floats with 4 decimals (a :class:`Number` with its own format), ``None`` as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞"
        if isinstance(value, Number):
            return format(float(value), value.spec)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)
