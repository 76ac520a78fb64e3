"""Component schemas kept on disk, so that checking a recipe imports no torch.

Validating a recipe reads, for every component it names, the recipe
parameters (the factory's signature), a few class attributes (``outputs``,
``requires_teacher``, ...; :data:`SCHEMA_ATTRS`) and calls its
``check_params``. Those live on classes defined beside ``nn.Module`` code, so
reading them imports torch (2–3 s on a 2-core CPU), longer than the whole
check. The first time a lazily registered component is read, its schema is
written to a small JSON file in the per-user cache folder (``$KDT_CACHE_DIR``,
or ``$XDG_CACHE_HOME/kdtoolkit``, default ``~/.cache/kdtoolkit``):
``component-schemas-v2.json``. Later checks read the schema instead of
importing the factory's module. A ``check_params`` declared as rules
(:class:`~kdtoolkit.plugin.params.ParamChecks`) and taps declared with
:class:`~kdtoolkit.plugin.params.TapsFrom` are kept as data, so they import
nothing; a ``check_params`` function (and a function rule) is kept as a
reference and called from the module that defines it, which imports no torch
when the plugin keeps it in a module of its own (``docs/plugins.md``, "Fast
start-up").

An entry is used only while every module it was read from (the factory's,
those of its classes and of its ``check_params``) would be imported from the
same file, with the size and modification time recorded, under the same
Python, kdtoolkit and torch versions (another checkout or environment
sharing the cache finds its own files and does not use it); otherwise the
factory is imported and the entry written again. An entry is written only
from files older than the process's first use of components (a file edited
since may differ from the module imported). A schema with something JSON cannot hold (an
annotation or default of another type, an attribute that is not a plain
value) is not kept. A cache that cannot be read is ignored; one that cannot
be written is skipped.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import sys
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from kdtoolkit.plugin.params import REQUIRED, RULES, ParamChecks, ParamSpec, Rule, TapsFrom

#: The class attributes of components that recipe validation (and ``kdt report``: ``threshold_tables``) reads.
SCHEMA_ATTRS = (
    "outputs",
    "param_groups",
    "record_keys",
    "requires_records",
    "requires_outputs",
    "requires_labels",
    "provides_labels",
    "trains",
    "requires_teacher",
    "requires_reference",
    "requires_teacher_outputs",
    "requires_indices",
    "requires_taps",
    "requires_teacher_taps",
    "threshold_tables",
)

CACHE_FILE = "component-schemas-v2.json"

_UNSET = object()


class _NotKept(Exception):
    """A value the JSON schema cannot hold exactly."""


def cache_path() -> Path:
    """The schema cache file (in the folder of kdtoolkit's per-user caches)."""
    env = os.environ.get("KDT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kdtoolkit" / CACHE_FILE


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _environment() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "kdtoolkit": _version("kdtoolkit"),
        "torch": _version("torch"),
        "attrs": ",".join(SCHEMA_ATTRS),  # an attribute read since: entries written without it are not used
    }


# --------------------------------------------------------------------------- values and annotations


def _value(v: Any) -> Any:
    """A plain value as JSON, tuples and non-finite floats tagged so that they come back as they were."""
    kind = type(v)  # exact types: an enum or a numpy scalar would not come back as itself
    if v is None or kind in (bool, str, int):
        return v
    if kind is float:
        return v if v == v and v not in (float("inf"), float("-inf")) else {"float": repr(v)}
    if kind is list:
        return [_value(x) for x in v]
    if kind is tuple:
        return {"tuple": [_value(x) for x in v]}
    if kind is dict and all(type(k) is str for k in v):
        return {"dict": {k: _value(x) for k, x in v.items()}}
    raise _NotKept(kind.__name__)


def _unvalue(v: Any) -> Any:
    if isinstance(v, list):
        return [_unvalue(x) for x in v]
    if isinstance(v, dict):
        if "float" in v:
            return float(v["float"])
        if "tuple" in v:
            return tuple(_unvalue(x) for x in v["tuple"])
        return {k: _unvalue(x) for k, x in v["dict"].items()}
    return v


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "Path": pathlib.Path, "Any": Any}


def _annotation(ann: Any) -> Any:
    for name, t in _SIMPLE.items():
        if ann is t:
            return name
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return {"optional": _annotation(next(a for a in args if a is not type(None)))}
    if origin is typing.Literal:
        return {"literal": [_value(a) for a in args]}
    if origin is list:
        return {"list": _annotation(args[0]) if args else None}
    if origin is dict:
        return {"dict": [_annotation(a) for a in args] if args else None}
    raise _NotKept(repr(ann))


def _unannotation(obj: Any) -> Any:
    if isinstance(obj, str):
        return _SIMPLE[obj]
    if "optional" in obj:
        return _unannotation(obj["optional"]) | None
    if "literal" in obj:
        return typing.Literal[tuple(_unvalue(a) for a in obj["literal"])]
    if "list" in obj:  # list[T], dict[K, V] built from their arguments
        return list if obj["list"] is None else types.GenericAlias(list, (_unannotation(obj["list"]),))
    return dict if obj["dict"] is None else types.GenericAlias(dict, tuple(_unannotation(a) for a in obj["dict"]))


def _function(v: types.FunctionType) -> dict[str, str]:
    """A named function as its reference (a lambda or a local function is not importable by name)."""
    if "<" in v.__qualname__:
        raise _NotKept(v.__qualname__)
    return {"ref": f"{v.__module__}:{v.__qualname__}"}


def _attr(v: Any) -> Any:
    """An attribute: a plain value, a :class:`TapsFrom`, or a named function (e.g. ``requires_taps``) as
    its reference."""
    if isinstance(v, types.FunctionType):
        return _function(v)
    if type(v) is TapsFrom:
        return {"taps_from": list(v.keys)}
    return _value(v)


def _unattr(v: Any) -> Any:
    if isinstance(v, dict) and "ref" in v:
        return import_reference(v["ref"])
    if isinstance(v, dict) and "taps_from" in v:
        return TapsFrom(*v["taps_from"])
    return _unvalue(v)


def _checks(checks: ParamChecks) -> list[Any]:
    """Declared checks as data: each rule of :data:`~kdtoolkit.plugin.params.RULES` by its fields,
    each function by its reference."""
    out: list[Any] = []
    for rule in checks.rules:
        if isinstance(rule, types.FunctionType):
            out.append(_function(rule))
        elif isinstance(rule, Rule) and RULES.get(type(rule).__name__) is type(rule):
            fields = {f: _value(getattr(rule, f)) for f in rule.__dataclass_fields__}  # type: ignore[attr-defined]
            out.append({"rule": type(rule).__name__, "fields": fields})
        else:
            raise _NotKept(repr(rule))
    return out


def _unchecks(data: list[Any]) -> ParamChecks:
    return ParamChecks(
        *(
            import_reference(r["ref"])
            if "ref" in r
            else RULES[r["rule"]](**{k: _unvalue(v) for k, v in r["fields"].items()})
            for r in data
        )
    )


# --------------------------------------------------------------------------- files


def _module_file(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


def _stamp(module_name: str, path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [module_name, path, st.st_mtime_ns, st.st_size]


def _current(stamp: list) -> bool:
    """Whether the module of ``stamp`` would be imported from the same, unchanged file (another
    checkout or environment sharing the cache finds its own file, so the entry is not used)."""
    import importlib.util

    module_name, path = stamp[0], stamp[1]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not origin:
        return False
    return str(Path(origin).resolve()) == path and _stamp(module_name, path) == stamp


def _sources(factory: Any, functions: list[Any]) -> list[str]:
    """The modules whose source defines what the schema holds (torch's own excluded: its version is keyed)."""
    names = {factory.__module__}
    if inspect.isclass(factory):
        names.update(c.__module__ for c in factory.__mro__)
    names.update(f.__module__ for f in functions)
    return sorted(n for n in names if n and n.split(".")[0] not in ("builtins", "torch", "typing", "abc"))


# --------------------------------------------------------------------------- the cache


class SchemaCache:
    """The schema cache file, read once per process and written when an entry is added."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                ok = isinstance(data, dict) and data.get("environment") == _environment()
                self._data = data if ok and isinstance(data.get("components"), dict) else None
            except (OSError, ValueError, RecursionError):
                self._data = None
            if self._data is None:
                self._data = {"environment": _environment(), "components": {}}
        return self._data

    def get(self, reference: str) -> dict[str, Any] | None:
        """The schema of ``reference`` (``"module:Name"``) if kept and still current, else ``None``."""
        entry = self._load()["components"].get(reference)
        if not isinstance(entry, dict):
            return None
        try:
            if not all(_current(f) for f in entry["files"]):
                return None
            params = {
                name: ParamSpec(
                    name, _unannotation(p["annotation"]), REQUIRED if p.get("required") else _unvalue(p["default"])
                )
                for name, p in entry["params"].items()
            }
            attrs = {k: _unattr(v) for k, v in entry["attrs"].items()}
            checks = _unchecks(entry["checks"]) if "checks" in entry else None
        except (KeyError, TypeError, ValueError, AttributeError, ImportError):
            return None
        return {"params": params, "attrs": attrs, "check": entry.get("check"), "checks": checks}

    def put(self, reference: str, factory: Any, params: dict[str, ParamSpec], since_ns: int = 0) -> None:
        """Keep the schema of ``factory`` (already imported) under ``reference``; skipped when it
        holds something JSON cannot, when a source file changed after ``since_ns`` (it may differ
        from what was imported), or when the file cannot be written."""
        check = getattr(factory, "check_params", None)
        checks = check if type(check) is ParamChecks else None  # declared: kept as data
        if checks is not None:
            check_ref = f"{factory.__module__}:{factory.__qualname__}.check_params"
        elif check is not None:
            if not (
                isinstance(getattr(check, "__module__", None), str)
                and isinstance(getattr(check, "__qualname__", None), str)
            ):
                return  # e.g. a functools.partial: not importable by name
            check_ref = f"{check.__module__}:{check.__qualname__}"
        try:
            entry: dict[str, Any] = {
                "params": {
                    name: (
                        {"annotation": _annotation(p.annotation), "required": True}
                        if p.required
                        else {"annotation": _annotation(p.annotation), "default": _value(p.default)}
                    )
                    for name, p in params.items()
                },
                "attrs": {a: _attr(getattr(factory, a)) for a in SCHEMA_ATTRS if hasattr(factory, a)},
                "check": None if check is None else check_ref,
            }
            if checks is not None:
                entry["checks"] = _checks(checks)
        except _NotKept:
            return
        if checks is None and check is not None and "<" in check.__qualname__:  # a lambda or a local function
            return
        functions = [
            getattr(factory, a) for a in SCHEMA_ATTRS if isinstance(getattr(factory, a, None), types.FunctionType)
        ]
        if checks is not None:
            functions += [r for r in checks.rules if isinstance(r, types.FunctionType)]
        elif check is not None:
            functions.append(check)
        stamps = []
        for module in _sources(factory, functions):
            file = _module_file(module)
            stamp = _stamp(module, file) if file else None
            if stamp is None or stamp[2] > since_ns:  # no file, or one changed since it was imported
                return
            stamps.append(stamp)
        entry["files"] = stamps
        data = self._load()
        data["components"][reference] = entry
        from kdtoolkit.foundation.io import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(data))
        except OSError:  # a cache: not written is only slower next time
            pass


_CACHE: SchemaCache | None = None


def schema_cache() -> SchemaCache:
    """The process's schema cache (re-read when ``KDT_CACHE_DIR`` changes, e.g. in tests)."""
    global _CACHE
    if _CACHE is None or _CACHE.path != cache_path():
        _CACHE = SchemaCache()
    return _CACHE


def import_reference(reference: str) -> Any:
    """The object named by ``"module:qualified.name"``."""
    import importlib

    module_name, _, attr = reference.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
