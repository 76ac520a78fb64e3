"""Names that become paths, and the paths joined from them: one rule for both.

A recipe is a file people share, so nothing in it may choose where kdtoolkit
writes. Every name that recipe content turns into a file or folder name (a
stage name: a folder of the run directory; a phase name: ``push-<phase>.json``;
the recipe name: ``runs/<name>``) passes :func:`name_problem` when the recipe
is validated (``kdt validate``):

- it fully matches :data:`NAME_RE`: ASCII letters, digits, ``_``, ``-`` and
  ``.``, starting with a letter, digit or ``_`` (so no ``/``, ``\\``, ``..``,
  leading dot, space or newline);
- it has at most :data:`MAX_NAME_LENGTH` characters, which leaves room under the
  usual 255-byte file-name limit for the prefixes and suffixes writers add
  (``prototypes-<phase>.png``, the ``.<name>.*.tmp`` of an atomic write);
- it is none of :data:`RESERVED_NAMES` (the run and stage directories' own
  files and folders), no ``seed-<n>`` (the folders of a multi-seed run) and no
  ``report-<key>.png`` (the figures of its ``report.md``), compared ignoring
  case, since a case-insensitive file system (macOS, Windows) would give
  ``Results.json`` and ``results.json`` one file.

Every writer that joins such a name (or any other name read from a file: a
records file's stage name, a history entry) to a directory goes through
:func:`inside`, which refuses a part that is not one plain file name, resolves
the joined path (symbolic links included) and checks that it lies inside the
directory, before anything is written or any folder created. Plugins get this
through the run-directory API: :meth:`kdtoolkit.engine.phases.PhaseContext.stage_file`,
:meth:`kdtoolkit.use.rundir.StageDir.file` and
:meth:`kdtoolkit.use.rundir.RunDir.file`.

This module imports neither torch nor any plugin (``kdt validate`` uses it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kdtoolkit.foundation.errors import KdtError

#: A valid name, anchored at both ends (``\\Z``: ``$`` would also match before a final newline).
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")

#: The longest name, in characters (ASCII only, so also in bytes).
MAX_NAME_LENGTH = 100

#: The longest single path component a writer may join (the usual file-name limit, in bytes).
MAX_FILE_NAME_BYTES = 255

#: What ``kdt run``, ``kdt run --seeds``, ``kdt report`` and ``kdt explain`` write into a run directory.
RUN_DIR_NAMES = (
    "recipe.resolved.toml",
    "recipe.resolved.json",
    "run.json",
    "results.json",
    "results.md",
    "training.png",
    "seeds.json",
    "report.md",
    "report-training.png",
    "explanations",
)

#: What ``kdt run``, ``kdt evaluate``, ``kdt export`` and ``kdt explain`` write into a stage directory.
STAGE_DIR_NAMES = (
    "model.safetensors",
    "result.json",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "losses.safetensors",
    "records.safetensors",
    "evaluations",
    "explanations",
    "model.pt",
    "model.pt2",
)

#: Names a stage, phase or recipe may not have, lower-case (compared with ``str.casefold``).
RESERVED_NAMES = frozenset(n.casefold() for n in RUN_DIR_NAMES + STAGE_DIR_NAMES + (".", ".."))

#: Reserved as well: the folders ``seed-<n>`` of a multi-seed run (``kdt run --seeds``).
RESERVED_RE = re.compile(r"seed-[0-9]+\Z", re.IGNORECASE)

#: Reserved as well: the figures of ``report.md`` beside the seed folders, one per result a metric
#: draws against its threshold (``report-<result key>.png``; ``kdt report``).
REPORT_FIGURE_RE = re.compile(r"report-.+\.png\Z", re.IGNORECASE)

NAME_RULE = "letters, digits, '_', '-' and '.', starting with a letter, digit or '_'"


def _shown(name: str, limit: int = 40) -> str:
    """``name`` quoted for a one-line message (escapes visible, long names cut)."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def key_name(name: str) -> str:
    """``name`` as it is shown in a key path (``stages.<name>``): as it is when it fully matches
    :data:`NAME_RE` and is not too long, else quoted, escaped and cut, so that an error stays one line."""
    return name if NAME_RE.match(name) and len(name) <= MAX_NAME_LENGTH else _shown(name)


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a stage, phase or recipe name (``None`` when it can).

    >>> name_problem("kd_t4") is None
    True
    >>> name_problem("../escaped")
    "'../escaped' is not a valid name: use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'"
    """
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not NAME_RE.match(name):
        return f"{_shown(name)} is not a valid name: use {NAME_RULE}"
    if len(name) > MAX_NAME_LENGTH:
        return f"{_shown(name)} is {len(name)} characters long; names have at most {MAX_NAME_LENGTH}"
    if name.casefold() in RESERVED_NAMES:
        return (
            f"{_shown(name)} is reserved: run and stage directories have their own file or folder of that name "
            "(compared ignoring case)"
        )
    if RESERVED_RE.match(name):
        return f"{_shown(name)} is reserved for the seed folders of a multi-seed run (seed-<n>)"
    if REPORT_FIGURE_RE.match(name):
        return f"{_shown(name)} is reserved for the figures of a report over several runs (report-<key>.png)"
    return None


def check_name(name: Any, *, source: str | None = None, key: str | None = None) -> str:
    """``name`` itself if :func:`name_problem` finds nothing.

    :raises KdtError: naming ``source`` and ``key``, otherwise.
    """
    problem = name_problem(name)
    if problem is not None:
        raise KdtError(problem, source=source, key=key)
    return name


def safe_name(text: str) -> str:
    """``text`` made a valid name: other characters become ``_``, a leading ``.`` or ``-`` too; cut to
    :data:`MAX_NAME_LENGTH`; a reserved result gets ``_run`` appended. Used for the default recipe name
    (the recipe file's stem, which the user chose but the rule still applies to)."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    out = re.sub(r"^[.-]", "_", out)[:MAX_NAME_LENGTH] or "recipe"
    if name_problem(out) is not None:
        out = out[: MAX_NAME_LENGTH - 4] + "_run"
    return out


def _part_problem(part: Any) -> str | None:
    if not isinstance(part, (str, os.PathLike)):
        return f"expected a file name, got {type(part).__name__}"
    text = os.fspath(part)
    if not isinstance(text, str):
        return "expected a file name, got bytes"
    if (
        not text
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or os.sep in text
        or any(ord(c) < 32 or ord(c) == 127 for c in text)
    ):
        return f"{_shown(text)} is not a single file name (no separators, '.', '..' or control characters)"
    if len(text.encode("utf-8", "surrogateescape")) > MAX_FILE_NAME_BYTES:
        return f"{_shown(text)} is longer than {MAX_FILE_NAME_BYTES} bytes"
    return None


def inside(base: str | Path, *parts: str, what: str = "directory", follow_links: bool = True) -> Path:
    """``base / parts[0] / parts[1] ...``, checked to lie inside ``base``; nothing is created.

    Each part must be one file name: no ``/`` or ``\\``, not ``.`` or ``..``,
    not empty, at most :data:`MAX_FILE_NAME_BYTES` bytes. The joined path is
    then resolved (symbolic links of what exists already are followed, so a
    link planted in the directory, e.g. by an unpacked run directory, cannot
    redirect a write) and must lie inside the resolved ``base``. Call it
    before writing or creating anything.

    :param base: the directory (a run or stage directory, an output folder).
    :param parts: the names to join below it.
    :param what: how ``base`` is named in the error (``"run directory"``, ``"stage directory"``).
    :param follow_links: ``False`` checks the parts only (the path is then inside ``base`` as
        written), for a folder the user may have linked elsewhere on purpose, such as ``runs/<name>``.
    :raises KdtError: one line naming ``base``, when a part is no plain file name or the path leaves ``base``.
    """
    base = Path(base)
    for part in parts:
        problem = _part_problem(part)
        if problem is not None:
            raise KdtError(f"refusing a path inside the {what}: {problem}", source=str(base))
    joined = base.joinpath(*parts)
    if not follow_links:
        return joined
    try:
        root = base.resolve()
        target = joined.resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic-link loop (RuntimeError before Python 3.13), a bad link
        raise KdtError(
            f"refusing the path {_shown(os.path.join(*parts))}: it cannot be resolved "
            f"({' '.join(str(exc).split())[:80]})",
            source=str(base),
        ) from None
    if target != root and root not in target.parents:
        raise KdtError(
            f"refusing the path {_shown(os.path.join(*parts))}: it resolves to {target}, outside the {what}",
            source=str(base),
        )
    return joined
