"""Every hook of the plugin contract is documented in docs/plugins.md.

A hook counts as documented when a Markdown heading line of docs/plugins.md
contains its name, e.g. ``### `kdt_register_losses(registry)` ``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from kdtoolkit.plugin import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("kdt_") and fn.__module__ == hookspecs.__name__
    )


def heading_lines(text: str) -> list[str]:
    """Markdown ATX headings, skipping fenced code blocks (where ``#`` is a comment)."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s{0,3}(```|~~~)", line):
            fenced = not fenced
        elif not fenced and re.match(r"^\s{0,3}#{1,6}\s", line):
            out.append(line)
    return out


def documented_in_headings(text: str) -> set[str]:
    return {n for line in heading_lines(text) for n in re.findall(r"\bkdt_[A-Za-z0-9_]+\b", line)}


def test_hookspecs_are_found():
    names = hook_names()
    # the contract's registration hooks and observers; guards against a vacuous pass
    for expected in ("kdt_register_losses", "kdt_register_backbones", "kdt_add_commands", "kdt_after_epoch"):
        assert expected in names
    for name in names:
        assert hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec"), f"{name} is not a @hookspec"


def test_every_hook_is_documented_in_docs_plugins_md():
    names = hook_names()
    if not DOC.is_file():
        raise AssertionError(
            f"{DOC} does not exist; it must document every hook in a heading line. "
            f"Missing ({len(names)}): {', '.join(names)}"
        )
    documented = documented_in_headings(DOC.read_text(encoding="utf-8"))
    missing = [n for n in names if n not in documented]
    assert not missing, (
        f"{len(missing)} hook(s) of kdtoolkit.plugin.hookspecs have no heading in {DOC} "
        f"(e.g. '### `{missing[0]}(...)`'): {', '.join(missing)}"
    )


def test_docs_name_no_hook_that_does_not_exist():
    """A heading documenting a hook (``kdt_name(...)``) that is not in hookspecs is
    a stale or misspelled entry."""
    if not DOC.is_file():
        return  # reported by the test above
    text = DOC.read_text(encoding="utf-8")
    called = {m for l in heading_lines(text) for m in re.findall(r"\b(kdt_[A-Za-z0-9_]+)\(", l)}
    unknown = sorted(called - set(hook_names()))
    assert not unknown, f"{DOC} has headings for hooks that do not exist: {', '.join(unknown)}"
