"""The quality gates of the test command: lint and format (ruff), types (mypy) and the import contracts
(import-linter), each configured in ``pyproject.toml`` and run over the whole repository as the
command line would run it (``docs/architecture.md``, "Layers" and "Quality gates").

A gate whose tool is not installed is skipped, naming the tool; ``pip install -e ".[test]"`` installs
all three. A failing gate fails with the tool's own report.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: import-linter's command line, run with this interpreter (the tool has no ``python -m`` entry).
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _gate(module: str, package: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``python <args>`` from the repository root; fail with the tool's output unless it exits 0.

    :param module: the tool's importable module, to tell whether it is installed.
    :param package: the tool's distribution name, for the skip message.
    :param args: the interpreter's arguments (``-m ruff check .``, ...).
    :param env: extra environment variables.
    """
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{package} failed (exit code {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_ruff_check() -> None:
    """``ruff check .``: the lint rules of ``[tool.ruff.lint]``."""
    _gate("ruff", "ruff", ["-m", "ruff", "check", "--no-fix", "."])


def test_ruff_format() -> None:
    """``ruff format --check .``: every file formatted (line length 120)."""
    _gate("ruff", "ruff", ["-m", "ruff", "format", "--check", "."])


def test_import_contracts() -> None:
    """``lint-imports``: the layers of kdtoolkit, the core free of plugins, the bundles independent.

    ``plugins/`` goes on the path too, so that a bundle added since the last ``pip install -e .`` is
    found (an editable install maps the packages it saw when it was installed)."""
    path = os.pathsep.join(p for p in (str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")) if p)
    _gate("importlinter", "import-linter", ["-c", LINT_IMPORTS], env={"PYTHONPATH": path})


def test_mypy() -> None:
    """``mypy``: the types of ``kdtoolkit/`` and ``plugins/``, as ``[tool.mypy]`` configures."""
    _gate("mypy", "mypy", ["-m", "mypy"])
