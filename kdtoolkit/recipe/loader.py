"""TOML recipes: loading, ``extends``, ``--set`` overrides and validation.

A recipe is validated completely — every key, type, range, component name,
cross-reference and file — before anything is built or written. Any problem
raises :class:`~kdtoolkit.foundation.errors.RecipeError` naming the file and the key path,
e.g. ``recipes/x.toml: stages.kd.losses[1].weight: expected a number, got "ten"``.

The result of :func:`load_recipe` is a :class:`Recipe` whose ``resolved`` dict
has every default filled in; it is what ``kdt validate`` prints and what a run
records in ``recipe.resolved.toml``. The recipe keys are documented in
``docs/recipes.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from kdtoolkit.foundation.errors import KdtError, RecipeError
from kdtoolkit.plugin.params import describe_value
from kdtoolkit.plugin.manager import PluginManager

from kdtoolkit.recipe.validator import Validator, deep_merge


@dataclass
class Recipe:
    """A loaded, validated recipe.

    :ivar path: the recipe file.
    :ivar resolved: the recipe with every default filled in (a plain dict).
    :ivar order: stage names in dependency order (teachers first).
    """

    path: Path
    resolved: dict[str, Any]
    order: list[str]

    def stage(self, name: str) -> dict[str, Any]:
        return self.resolved["stages"][name]

    def stage_hash(self, name: str) -> str:
        """A hash of everything that determines the stage's result.

        It covers the stage's resolved table, the global seed, device-independent
        settings and, recursively, the hashes of the stages it depends on.
        """
        st = self.stage(name)
        deps = [d for d in (st.get("teacher"), st.get("compare_to")) if d]
        # "memory" and "disk" give the same numbers; "off" leaves the hashes of earlier runs unchanged
        st = {k: v for k, v in st.items() if k != "teacher_cache"}
        # the memory kept for decoded images changes no number (nor the hashes of earlier runs)
        st["data"] = {k: v for k, v in st["data"].items() if k != "cache_mb"}
        if self.stage(name).get("teacher_cache", "off") != "off":
            st["teacher_cache"] = "on"
        payload = {
            "stage": st,
            "precision": self.resolved["precision"],
            "deps": {d: self.stage_hash(d) for d in deps},
        }
        layout = self.resolved.get("channels_last")
        if layout:  # only when on: the hashes of earlier runs with it off stay valid
            payload["channels_last"] = layout
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        from kdtoolkit.foundation.tomlwrite import dumps

        return dumps(self.resolved)


# ---------------------------------------------------------------------------
# loading

#: How deeply tables and lists may nest in a recipe (a recipe needs about 6 levels).
MAX_DEPTH = 64


def check_depth(
    data: Any, source: str, key: str | None = None, limit: int = MAX_DEPTH, error: type[KdtError] = RecipeError
) -> None:
    """Refuse tables and lists (dicts and lists) nested more than ``limit`` levels deep, without recursion.

    :raises RecipeError: (or ``error``) naming ``source`` (and ``key``) and the path where the limit is crossed.
    """
    stack: list[tuple[Any, int, tuple]] = [(data, 0, ())]
    while stack:
        node, depth, where = stack.pop()
        if depth > limit:
            shown = key_string(list(where[:4])) + (" ..." if len(where) > 4 else "")
            raise error(f"tables and lists nested more than {limit} levels deep (at {shown})", source=source, key=key)
        if isinstance(node, dict):
            stack.extend((v, depth + 1, where + (str(k),)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, where + (i,)) for i, v in enumerate(node))


def _read_toml(path: Path, *, source: str, key: str | None) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"file not found: {path}", source=source, key=key) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {path}: {type(exc).__name__}", source=source, key=key) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", source=str(path)) from None
    except RecursionError:
        raise RecipeError(f"invalid TOML: nested more than {MAX_DEPTH} levels deep", source=str(path)) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RecipeError(f"invalid TOML: {' '.join(str(exc).split())[:200]}", source=str(path)) from None
    check_depth(data, str(path))
    return data


def key_string(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """``["stages", "kd", "phases", 0]`` → ``"stages.kd.phases[0]"`` (the inverse of :func:`parse_key_path`)."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def _leaf_keys(data: Any, prefix: tuple = ()) -> list[str]:
    """The key path of every value of a TOML document that is not a table."""
    if isinstance(data, dict):
        return [k for name, value in data.items() for k in _leaf_keys(value, prefix + (name,))]
    return [key_string(prefix)]


def _set_origin(origins: dict[str, str], key: str, folder: str) -> None:
    """``key`` now comes from ``folder``; nothing below it comes from anywhere else."""
    for k in [k for k in origins if k.startswith((key + ".", key + "["))]:
        del origins[k]
    origins[key] = folder


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged recipe, and for every value not a table the folder of the file that set it."""
    data = _read_toml(path, source=str(chain[-1]) if chain else str(path), key="extends" if chain else None)
    parent = data.pop("extends", None)
    folder = os.path.abspath(path.parent)
    if parent is None:
        return data, {k: folder for k in _leaf_keys(data)}
    if not isinstance(parent, str):
        raise RecipeError(f"expected a string, got {describe_value(parent)}", source=str(path), key="extends")
    parent_path = (path.parent / parent).resolve()
    if len(chain) >= MAX_DEPTH:
        raise RecipeError(f"'extends' chains more than {MAX_DEPTH} files", source=str(path), key="extends")
    if parent_path in chain or parent_path == path.resolve():
        raise RecipeError(f"'extends' forms a cycle through {parent}", source=str(path), key="extends")
    if not parent_path.is_file():
        raise RecipeError(f"file not found: {parent}", source=str(path), key="extends")
    base, origins = _load_with_extends(parent_path, chain + (path.resolve(),))
    for key in _leaf_keys(data):
        _set_origin(origins, key, folder)
    return deep_merge(base, data), origins


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key_path(path: str) -> list[str | int]:
    """``"stages.kd.phases[0].epochs"`` → ``["stages", "kd", "phases", 0, "epochs"]``."""
    out: list[str | int] = []
    pos = 0
    for m in _SEGMENT.finditer(path):
        gap = path[pos : m.start()]
        if gap not in ("", "."):
            raise ValueError(f"malformed key path {path!r}")
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if pos != len(path) or not out or not isinstance(out[0], str):
        raise ValueError(f"malformed key path {path!r}")
    return out


def parse_override_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``, ``inf``) or a bare string.

    :raises RecipeError: (source ``--set``) for a value nested more than :data:`MAX_DEPTH` levels deep.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise RecipeError(f"value nested more than {MAX_DEPTH} levels deep", source="--set") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RecipeError(f"unreadable value: {' '.join(str(exc).split())[:200]}", source="--set") from None
    check_depth(value, "--set")
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override in place.

    :raises RecipeError: (source ``--set``) for a malformed assignment or a
        path through a non-table.
    """
    if "=" not in assignment:
        raise RecipeError(f"expected KEY=VALUE, got {assignment!r}", source="--set")
    key, _, raw = assignment.partition("=")
    key = key.strip()
    try:
        parts = parse_key_path(key)
    except ValueError as exc:
        raise RecipeError(str(exc), source="--set") from None
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"no item [{part}] to set", source="--set", key=key)
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"'{part}' is not inside a table", source="--set", key=key)
        if part not in node:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = parts[-1]
    try:
        value = parse_override_value(raw.strip())
    except RecipeError as exc:
        raise RecipeError(exc.message, source="--set", key=key) from None
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"no item [{last}] to set", source="--set", key=key)
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError("the parent of this key is not a table", source="--set", key=key)
        node[last] = value


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, plugins: PluginManager | None = None
) -> Recipe:
    """Read, merge (``extends``), override (``--set``) and validate a recipe.

    :param path: the recipe file.
    :param overrides: ``KEY=VALUE`` assignments applied after ``extends``.
    :param plugins: the plugin manager whose registries name the components
        (default: the process-wide one).
    :raises RecipeError: on the first problem, naming file and key.
    """
    from kdtoolkit.plugin.manager import get_manager

    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found" if not path.exists() else "not a file", source=str(path))
    try:
        return _load_recipe(path, overrides, plugins or get_manager())
    except RecursionError:  # a bound above missed a case: still one line
        raise RecipeError(
            "nested too deeply to check (tables, lists, 'extends', stage bases or teachers)", source=str(path)
        ) from None


def _load_recipe(path: Path, overrides: list[str] | tuple[str, ...], plugins: PluginManager) -> Recipe:
    data, origins = _load_with_extends(path)
    for assignment in overrides:
        if assignment.partition("=")[0].strip() == "extends":
            raise RecipeError(
                "'extends' is resolved before overrides; edit the recipe file instead", source="--set", key="extends"
            )
        apply_override(data, assignment)
        _set_origin(origins, key_string(parse_key_path(assignment.partition("=")[0].strip())), os.getcwd())
    check_depth(data, str(path))  # the overrides together with the files
    validator = Validator(str(path), plugins, base_dir=os.path.abspath(path.parent), origins=origins)
    resolved, order = validator.recipe(data, default_name=path.stem)
    return Recipe(path=path, resolved=resolved, order=order)
