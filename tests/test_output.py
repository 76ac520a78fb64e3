"""Tables that survive pipes: Markdown when stdout is not a terminal, wrapped (never cut) cells on one."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from kdtoolkit.foundation.tables import Table, print_tables

LONG = "a-very-long-cell-value-that-no-narrow-terminal-can-show-on-one-line-0.987654"


def _table() -> Table:
    return Table("Results", ["stage", "accuracy", "note"], [["kd", 0.98765, LONG], ["baseline", None, "x"]], note="n")


def test_piped_tables_are_plain_markdown_with_every_cell_in_full():
    out = io.StringIO()
    print_tables([_table(), _table()], file=out)
    text = out.getvalue()
    assert text.startswith("## Results\n\n| stage | accuracy | note |\n|---|---|---|\n")
    assert f"| kd | 0.9877 | {LONG} |" in text and "| baseline | — | x |" in text
    assert "…" not in text and text.count("## Results") == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_tables_wrap_cells_rather_than_cutting_them():
    out = _Terminal()
    print_tables([_table()], file=out, width=40)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())  # without the terminal's colour codes
    assert "…" not in text and "│" in text
    assert max(len(line) for line in text.splitlines()) <= 40
    # the long cell is folded over several lines (the other cells of those lines are blank): all of it is there
    assert LONG in re.sub(r"[\s│┃┡┩━─╇┼╪]", "", text)


def test_kdt_plugins_piped_is_markdown():
    proc = subprocess.run([sys.executable, "-m", "kdtoolkit", "plugins"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "## kdt plugins" and "…" not in proc.stdout
    row = next(l for l in lines if l.startswith("| protopnet |"))
    assert "heads: protopnet" in row and "phases: push" in row


def test_cells_are_text_never_rich_markup():
    out = _Terminal()
    table = Table("[bold]title", ["col"], [["error in [/opt/x] and [red]not red[/]"]], note="[dim]n")
    print_tables([table], file=out, width=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    assert "[/opt/x]" in text and "[red]not red[/]" in text and "[bold]title" in text
