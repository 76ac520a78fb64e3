"""The architecture as written down: every module in the map of ``docs/architecture.md``, no module of
kdtoolkit importing a higher layer or another module's private name, and the bundles importing only
the public API of kdtoolkit.

Read from the source with :mod:`ast` (nothing is imported but the packages whose ``__all__`` is
checked), so that these checks need neither import-linter nor torch. The layer order is the one of
the import-linter ``layers`` contract in ``pyproject.toml``, which ``lint-imports`` enforces too
(``tests/test_quality_gates.py``).
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kdtoolkit"
PLUGINS = ROOT / "plugins"
MAP = ROOT / "docs" / "architecture.md"

#: The packages of kdtoolkit whose ``__all__`` is the public API that bundles import from.
PUBLIC_PACKAGES = (
    "kdtoolkit",
    "kdtoolkit.foundation",
    "kdtoolkit.plugin",
    "kdtoolkit.recipe",
    "kdtoolkit.results",
    "kdtoolkit.engine",
    "kdtoolkit.use",
    "kdtoolkit.testing",
)


# -- reading the source ---------------------------------------------------------------------------


def _source_files(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    """``kdtoolkit/use/rundir.py`` → ``kdtoolkit.use.rundir``; ``plugins/kdt_data/plugin.py`` →
    ``kdt_data.plugin``; a package's ``__init__.py`` → the package."""
    rel = path.relative_to(PLUGINS if path.is_relative_to(PLUGINS) else ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_path(name: str) -> Path | None:
    """The file of first-party module ``name``, or ``None`` when there is none."""
    parts = name.split(".")
    base = ROOT if parts[0] == "kdtoolkit" else PLUGINS
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _first_party(name: str) -> bool:
    top = name.split(".")[0]
    return top == "kdtoolkit" or top.startswith("kdt_")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


@dataclass(frozen=True)
class Import:
    """One first-party import of a module: ``from module import names`` or ``import module``."""

    line: int
    module: str
    names: tuple[str, ...]  # empty for ``import module``


def _parse(path: Path, source: str | None = None) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8") if source is None else source, str(path))


def _imports(path: Path, source: str | None = None) -> Iterator[Import]:
    """Every first-party import of the module at ``path`` (its text ``source``, read from ``path``
    unless given), wherever it stands (in a function too: a lazy import is an import), relative ones
    resolved; ``from pkg import module`` gives ``pkg.module``."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(_parse(path, source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _first_party(alias.name):
                    yield Import(node.lineno, alias.name, ())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not _first_party(module):
                continue
            names = tuple(a.name for a in node.names)
            submodules = [n for n in names if _module_path(f"{module}.{n}") is not None]
            for n in submodules:
                yield Import(node.lineno, f"{module}.{n}", ())
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                yield Import(node.lineno, module, rest)


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to first-party modules: ``import kdtoolkit.x.y as m``, ``from kdtoolkit.x import y``."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _first_party(a.name) and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and _first_party(node.module):
            for a in node.names:
                if _module_path(f"{node.module}.{a.name}") is not None:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _private_uses(path: Path, source: str | None = None) -> list[str]:
    """Where the module at ``path`` (its text ``source``, read from ``path`` unless given) reaches
    another module's private name: ``from m import _x``, a private module imported from outside the
    package that holds it, or ``m._x`` on an imported module ``m``."""
    this = _module_name(path)
    found = []
    for imp in _imports(path, source):
        if imp.module == this:
            continue
        for name in imp.names:
            if _private(name):
                found.append(f"{path.relative_to(ROOT)}:{imp.line}: imports {name} from {imp.module}")
        parts = imp.module.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if _private(part) and not (this == owner or this.startswith(owner + ".")):
                found.append(f"{path.relative_to(ROOT)}:{imp.line}: imports the private module {imp.module}")
    tree = _parse(path, source)
    aliases = _module_aliases(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
            and aliases[node.value.id] != this
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return found


# -- layers ---------------------------------------------------------------------------------------


def _layers() -> list[list[str]]:
    """The layers of kdtoolkit from the top, as the import-linter contract in ``pyproject.toml`` lists
    them; each layer a list of sibling packages (``a | b``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layered = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["kdtoolkit"]]
    assert len(layered) == 1, "pyproject.toml: one import-linter layers contract for kdtoolkit"
    return [[p.strip() for p in re.split(r"[|:]", layer)] for layer in layered[0]["layers"]]


def _rank() -> dict[str, int]:
    layers = _layers()
    return {pkg: len(layers) - i for i, layer in enumerate(layers) for pkg in layer}


def _packages() -> list[str]:
    """The packages of kdtoolkit (its folders with an ``__init__.py``)."""
    return sorted(p.parent.name for p in CORE.glob("*/__init__.py"))


def test_every_package_of_kdtoolkit_is_in_a_layer():
    rank = _rank()
    assert sorted(rank) == _packages(), "each package of kdtoolkit in one layer of the contract in pyproject.toml"
    top_level = sorted(p.name for p in CORE.glob("*.py"))
    assert top_level == ["__init__.py", "__main__.py", "_compat.py"], "at most three modules at the top level"


def _layer_violations(path: Path, source: str | None = None) -> list[str]:
    """The imports of the kdtoolkit module at ``path`` (its text ``source``, read from ``path`` unless
    given) that go against the layers: a higher or sibling layer, a module outside the layers, a plugin."""
    rel = path.relative_to(CORE).parts
    if len(rel) == 1:
        return []  # the top-level modules stand outside the layers
    rank, pkg, where = _rank(), rel[0], path.relative_to(ROOT)
    found = []
    for imp in _imports(path, source):
        parts = imp.module.split(".")
        if parts[0] != "kdtoolkit":
            found.append(f"{where}:{imp.line}: imports the plugin {imp.module}")
        elif len(parts) == 1 or parts[1] == pkg:
            continue  # its own package, or a name of kdtoolkit's own __init__ (``__version__``)
        elif parts[1] not in rank:
            found.append(f"{where}:{imp.line}: imports {imp.module}, outside the layers")
        elif rank[parts[1]] >= rank[pkg]:
            found.append(
                f"{where}:{imp.line}: kdtoolkit.{pkg} (layer {rank[pkg]}) imports {imp.module} (layer {rank[parts[1]]})"
            )
    return found


def test_no_module_of_kdtoolkit_imports_a_higher_layer():
    found = [line for path in _source_files(CORE) for line in _layer_violations(path)]
    assert not found, "imports against the layers (docs/architecture.md, Layers):\n" + "\n".join(found)


def test_the_layer_check_sees_each_form():
    """The check itself: an upward import at module level, in a function and under ``TYPE_CHECKING``,
    a relative one, a top-level private module and a plugin are found; downward imports are not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from kdtoolkit.foundation.errors import KdtError\n"
        "from kdtoolkit.plugin import hookimpl\n"
        "from . import loader\n"
        "from .. import engine\n"
        "if TYPE_CHECKING:\n"
        "    from kdtoolkit.use.rundir import RunDir\n"
        "def f():\n"
        "    import kdtoolkit.cli.commands\n"
        "    from kdtoolkit import _compat, __version__\n"
        "    import kdt_data\n"
    )
    found = _layer_violations(CORE / "recipe" / "probe.py", source)
    assert [line.split(": ", 1)[1] for line in found] == [
        "kdtoolkit.recipe (layer 3) imports kdtoolkit.engine (layer 5)",
        "kdtoolkit.recipe (layer 3) imports kdtoolkit.use.rundir (layer 6)",
        "kdtoolkit.recipe (layer 3) imports kdtoolkit.cli.commands (layer 7)",
        "imports kdtoolkit._compat, outside the layers",
        "imports the plugin kdt_data",
    ]


def test_no_module_imports_another_modules_private_name():
    found = [line for path in _source_files(CORE) + _source_files(PLUGINS) for line in _private_uses(path)]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_private_name_check_sees_each_form():
    """The check itself: each way of reaching a private name is found; public names, a module's own
    private names and a private module used inside its package are not."""
    source = (
        "from kdtoolkit.foundation.io import _named, atomic_write_json\n"
        "import kdtoolkit.foundation.io as fio\n"
        "from kdtoolkit import _compat\n"
        "def f():\n"
        "    return fio._write_fd, fio.atomic_write_json\n"
    )
    found = _private_uses(PLUGINS / "kdt_example" / "probe.py", source)
    assert len(found) == 3, found
    assert "imports _named from kdtoolkit.foundation.io" in found[0]
    assert "imports the private module kdtoolkit._compat" in found[1]
    assert "uses kdtoolkit.foundation.io._write_fd" in found[2]
    inside = _private_uses(CORE / "use" / "probe.py", "from kdtoolkit import _compat\n")
    assert inside == []
    own = _private_uses(CORE / "foundation" / "io.py", "from kdtoolkit.foundation.io import _named\n")
    assert own == []


# -- the public API of kdtoolkit, as bundles see it -----------------------------------------------


def _bundles() -> list[str]:
    return sorted(p.parent.name for p in PLUGINS.glob("*/__init__.py"))


@pytest.mark.parametrize("bundle", _bundles())
def test_bundles_import_only_the_public_api_of_kdtoolkit(bundle):
    """Every ``from kdtoolkit... import name`` of a bundle names a package of :data:`PUBLIC_PACKAGES`
    and a name in its ``__all__``; never a module (``kdtoolkit.foundation.io``), never a private name."""
    found = []
    for path in _source_files(PLUGINS / bundle):
        for imp in _imports(path):
            if imp.module.split(".")[0] != "kdtoolkit":
                continue
            where = f"{path.relative_to(ROOT)}:{imp.line}"
            if imp.module not in PUBLIC_PACKAGES:
                found.append(f"{where}: imports {imp.module}: import from one of {', '.join(PUBLIC_PACKAGES)}")
                continue
            public = set(importlib.import_module(imp.module).__all__)
            found += [f"{where}: {imp.module} does not export {n}" for n in imp.names if n not in public]
            if not imp.names:
                found.append(f"{where}: import {imp.module}: import the names it exports instead")
    assert not found, "imports of kdtoolkit that are not its public API:\n" + "\n".join(found)


# -- the module map of docs/architecture.md -------------------------------------------------------

#: A map section: ``### `kdtoolkit/use/` ...`` or ``### `plugins/kdt_data/` ...``.
SECTION = re.compile(r"^### `((?:kdtoolkit|plugins)/[\w/]*)`", re.M)
#: A table row naming a module in its first cell: ``| `rundir.py` | ... |``.
ROW = re.compile(r"^\| `([\w/.]+\.py)` \|", re.M)


def _map() -> dict[str, set[str]]:
    """The folders the map of ``docs/architecture.md`` has a section for, each with the module paths
    its table names (relative to the folder)."""
    text = MAP.read_text(encoding="utf-8")
    starts = list(SECTION.finditer(text))
    sections: dict[str, set[str]] = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        body = re.split(r"\n##+ ", text[m.end() : end], maxsplit=1)[0]
        sections[m.group(1).rstrip("/")] = set(ROW.findall(body))
    return sections


def _mapped_folders() -> dict[str, Path]:
    """Each folder that needs a table: kdtoolkit's top level, each of its packages, each bundle."""
    folders = {"kdtoolkit": CORE}
    folders |= {f"kdtoolkit/{p}": CORE / p for p in _packages()}
    folders |= {f"plugins/{b}": PLUGINS / b for b in _bundles()}
    return folders


def _needs_a_row(path: Path) -> bool:
    """A module needs its own row, except a package's ``__init__.py`` that only exports (the packages
    table describes it): one that defines a function or class besides ``__getattr__``/``__dir__`` needs one."""
    if path.name != "__init__.py" or path.parent == CORE:
        return True
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = [
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and n.name not in ("__getattr__", "__dir__")
    ]
    return bool(defined)


def test_every_module_is_in_the_architecture_map():
    sections = _map()
    missing, stale = [], []
    for key, folder in _mapped_folders().items():
        files = [p for p in _source_files(folder) if folder != CORE or p.parent == CORE]
        want = {p.relative_to(folder).as_posix() for p in files if _needs_a_row(p)}
        if key not in sections:
            missing.append(f"no section `{key}/` (with a | module | role | table)")
            continue
        missing += [f"`{key}/{m}`" for m in sorted(want - sections[key])]
        stale += [f"`{key}/{m}`" for m in sorted(sections[key]) if not (folder / m).is_file()]
    stale += [f"section `{k}/`" for k in sorted(set(sections) - set(_mapped_folders()))]
    assert not missing, "docs/architecture.md, Module map: add a row for each of\n" + "\n".join(missing)
    assert not stale, "docs/architecture.md, Module map: no such module (renamed or removed?)\n" + "\n".join(stale)


def test_the_map_lists_every_package_with_its_layer():
    text = MAP.read_text(encoding="utf-8")
    rank = _rank()
    for pkg in _packages():
        row = re.search(rf"^\| (\d+)[^|]*\| `kdtoolkit\.{pkg}` \|", text, re.M)
        assert row, f"docs/architecture.md: the packages table has no row for kdtoolkit.{pkg}"
        assert int(row.group(1)) == rank[pkg], f"kdtoolkit.{pkg}: layer {rank[pkg]} in pyproject.toml"
