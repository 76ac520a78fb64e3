"""Generate the reference pages ``docs/components.md`` and ``docs/api.md``.

``python -m kdtoolkit.cli.docgen`` rewrites them from the registries and
docstrings; ``python -m kdtoolkit.cli.docgen --check`` exits 1 when they are out
of date (a test runs it, so a new component, recipe key or public function
cannot go undocumented).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import TypeGuard

from kdtoolkit.plugin.params import REQUIRED, ParamChecks, type_name
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.protocols import protocol_members
from kdtoolkit.plugin.registry import KINDS, PLURALS
from kdtoolkit.plugin.schema_cache import SCHEMA_ATTRS

DOCS = Path(__file__).resolve().parents[2] / "docs"

#: Core modules whose public functions and classes make up the API reference.
CORE_MODULES = (
    "kdtoolkit.foundation.errors",
    "kdtoolkit.plugin.hookspecs",
    "kdtoolkit.plugin.manager",
    "kdtoolkit.plugin.registry",
    "kdtoolkit.plugin.params",
    "kdtoolkit.recipe.loader",
    "kdtoolkit.recipe.validator",
    "kdtoolkit.recipe.stage_checks",
    "kdtoolkit.recipe.checks",
    "kdtoolkit.foundation.paths",
    "kdtoolkit.plugin.contracts",
    "kdtoolkit.plugin.protocols",
    "kdtoolkit.engine.context",
    "kdtoolkit.foundation.device",
    "kdtoolkit.engine.data",
    "kdtoolkit.engine.models",
    "kdtoolkit.engine.taps",
    "kdtoolkit.engine.teacher",
    "kdtoolkit.engine.losses",
    "kdtoolkit.engine.optim",
    "kdtoolkit.engine.loop",
    "kdtoolkit.engine.phases",
    "kdtoolkit.engine.evaluation",
    "kdtoolkit.engine.runner",
    "kdtoolkit.engine.preflight",
    "kdtoolkit.use.rundir",
    "kdtoolkit.use.inspect",
    "kdtoolkit.use.predict",
    "kdtoolkit.use.evaluate",
    "kdtoolkit.use.export",
    "kdtoolkit.foundation.checkpoint",
    "kdtoolkit.results.records",
    "kdtoolkit.foundation.io",
    "kdtoolkit.foundation.limits",
    "kdtoolkit.foundation.tensorfiles",
    "kdtoolkit.foundation.distributed",
    "kdtoolkit.results.report",
    "kdtoolkit.foundation.progress",
    "kdtoolkit.plugin.builtin",
    "kdtoolkit.use.datacheck",
    "kdtoolkit.engine.multiseed",
    "kdtoolkit.results.aggregate",
    "kdtoolkit.results.rundir_files",
    "kdtoolkit.results.runs_report",
    "kdtoolkit.results.plots",
    "kdtoolkit.plugin.schema_cache",
    "kdtoolkit.engine.optim_checks",
)
#: The distribution whose registered components and bundle modules are documented.
DISTRIBUTION = "kdtoolkit"


def bundle_modules() -> tuple[str, ...]:
    """The modules of the built-in bundles: the packages of the ``kdt`` entry points that
    this project's own distribution declares (never an installed third-party plugin)."""
    import pkgutil
    from importlib import metadata

    out: list[str] = []
    for ep in metadata.entry_points(group="kdt"):
        dist = getattr(ep, "dist", None)
        if dist is None or (dist.metadata["Name"] or "").lower() != DISTRIBUTION:
            continue
        package = ep.value.split(":")[0].split(".")[0]
        mod = importlib.import_module(package)
        names = sorted(m.name for m in pkgutil.iter_modules(mod.__path__))
        out += [f"{package}.{n}" for n in names if not n.startswith("_")]
    return tuple(sorted(set(out)))


def api_modules() -> tuple[str, ...]:
    """Every module of the API reference: the core's, then the built-in bundles'."""
    return CORE_MODULES + bundle_modules()


_PARAM_RST = re.compile(r"^\s*:param\s+(\w+):\s*(.*)$")


def param_docs(obj) -> dict[str, str]:
    """Parameter descriptions from ``:param x:`` fields or an ``Args:``/``Parameters:`` section."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and not doc:
        doc = inspect.getdoc(obj.__init__) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    current = None
    in_section = False
    for line in lines:
        m = _PARAM_RST.match(line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
            continue
        stripped = line.strip()
        if stripped in ("Args:", "Parameters:", "Arguments:"):
            in_section, current = True, None
            continue
        if in_section:
            m2 = re.match(r"^\s{2,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m2 and len(line) - len(line.lstrip()) <= 8:
                current = m2.group(1)
                out[current] = m2.group(2).strip()
                continue
            if not stripped:
                current = None
                continue
            if not line.startswith(" "):
                in_section, current = False, None
                continue
        if current and stripped and line.startswith("    ") and not stripped.startswith(":"):
            out[current] += " " + stripped
        elif not stripped:
            current = None
    return out


def _default(p) -> str:
    if p.default is REQUIRED:
        return "required"
    v = p.default
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if v is None:
        return "unset"
    return f"`{v!r}`".replace("inf", "inf")


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def components_md(pm: PluginManager) -> str:
    out = [
        "# Components reference",
        "",
        "Generated by `python -m kdtoolkit.cli.docgen` from the registries and docstrings; do not edit by hand.",
        "Every component below is named in a recipe by its name; its parameters are recipe keys",
        "(validated against the types shown before anything runs). See `docs/recipes.md` for the core keys.",
        "",
    ]
    for kind in KINDS:
        reg = pm.registry(kind)
        if not len(reg):
            continue
        out += [f"## {PLURALS[kind].capitalize()}", ""]
        for comp in reg:
            out += [
                f"### `{comp.name}` ({kind}, plugin `{comp.owner}`)",
                "",
                _first_paragraph(comp.factory) or "(no description)",
                "",
            ]
            attrs = []
            for a in (
                "requires_teacher",
                "requires_outputs",
                "requires_teacher_outputs",
                "requires_reference",
                "requires_records",
                "outputs",
                "param_groups",
                "record_keys",
            ):
                if hasattr(comp.factory, a):
                    attrs.append(f"`{a}` = `{getattr(comp.factory, a)!r}`")
            if attrs:
                out += ["Declares: " + ", ".join(attrs) + ".", ""]
            if comp.params:
                docs = param_docs(comp.factory)
                check = getattr(comp.factory, "check_params", None)
                out += ["| key | type | default | meaning |", "|---|---|---|---|"]
                for name, p in comp.params.items():
                    text = docs.get(name, "").replace("|", "\\|")
                    rules = check.describe(name) if isinstance(check, ParamChecks) else []
                    shown = type_name(p.annotation) + (f" ({'; '.join(rules)})" if rules else "")
                    out.append(f"| `{name}` | {shown} | {_default(p)} | {text} |")
                out.append("")
            else:
                out += ["No parameters.", ""]
    return "\n".join(out).rstrip() + "\n"


def _public(mod) -> list[tuple[str, object]]:
    names = getattr(mod, "__all__", None)
    items: list[tuple[str, object]] = []
    for name, obj in vars(mod).items():
        if name.startswith("_"):
            continue
        if names is not None and name not in names:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if name.startswith("kdt_") and mod.__name__ != "kdtoolkit.plugin.hookspecs":
            continue  # hook implementations: documented by their hook (docs/plugins.md)
        items.append((name, obj))
    return items


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", sig)


def _cell(text: str) -> str:
    """``text`` on one line of a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def protocol_table(protocol: type) -> list[str]:
    """The members of a protocol of :mod:`kdtoolkit.plugin.protocols` as a Markdown table: each attribute
    with its type and default, each method with its signature, required or optional; then the names of
    the members it takes from its base protocols (documented with them)."""
    out = ["| member | kind | type | default | meaning |", "|---|---|---|---|---|"]
    inherited: dict[str, list[str]] = {}
    for m in protocol_members(protocol):
        if m.owner != protocol.__name__:
            inherited.setdefault(m.owner, []).append(f"`{m.name}`")
            continue
        if m.kind == "method":
            name, kind, typ, default = f"`{m.name}{m.type}`", "method", "", ""
        else:
            name, kind, typ = f"`{m.name}`", m.kind, f"`{m.type}`"
            default = "" if m.required else f"`{m.default!r}`"
        kind += ", required" if m.required else ", optional"
        if m.name in SCHEMA_ATTRS:
            kind += ", read from the registered class"
        out.append(f"| {_cell(name)} | {kind} | {_cell(typ)} | {_cell(default)} | {_cell(m.doc)} |")
    out.append("")
    if inherited:
        out += ["Also: " + "; ".join(f"{', '.join(names)} (`{owner}`)" for owner, names in inherited.items()) + ".", ""]
    return out


def _is_protocol(obj: object) -> TypeGuard[type]:
    return inspect.isclass(obj) and bool(getattr(obj, "_is_protocol", False))


def api_md() -> str:
    out = [
        "# API reference",
        "",
        "Generated by `python -m kdtoolkit.cli.docgen` from the docstrings; do not edit by hand.",
        "Public functions and classes of the core and of the built-in bundles (the full docstrings are in the code).",
        "",
    ]
    for modname in api_modules():
        mod = importlib.import_module(modname)
        out += [f"## `{modname}`", "", _first_paragraph(mod), ""]
        for name, obj in _public(mod):
            if _is_protocol(obj):
                bases = ", ".join(b.__name__ for b in obj.__bases__)
                out += [f"### `class {name}({bases})`", "", _first_paragraph(obj) or "(undocumented)", ""]
                out += protocol_table(obj)
                continue
            kind = "class" if inspect.isclass(obj) else "def"
            out += [f"### `{kind} {name}{_signature(obj)}`", "", _first_paragraph(obj) or "(undocumented)", ""]
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if mname.startswith("_") or not callable(member) or isinstance(member, type):
                        continue
                    fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                    if not inspect.isfunction(fn):
                        continue
                    out += [f"- `{name}.{mname}{_signature(fn)}`: {_first_paragraph(fn) or '(undocumented)'}"]
                if out[-1].startswith("- "):
                    out.append("")
    return "\n".join(out).rstrip() + "\n"


def own_manager() -> PluginManager:
    """A plugin manager with only this project's own plugins (entry points of third-party
    distributions are left out, so that their components never enter the project's docs)."""
    from kdtoolkit.plugin.manager import own_distribution_only

    with own_distribution_only():
        return PluginManager(autoload=True)


def generate() -> dict[Path, str]:
    pm = own_manager()
    return {DOCS / "components.md": components_md(pm), DOCS / "api.md": api_md()}


def undocumented() -> list[str]:
    """Public functions/classes/methods and component parameters without documentation."""
    missing = []
    for modname in api_modules():
        mod = importlib.import_module(modname)
        for name, obj in _public(mod):
            if not _first_paragraph(obj):
                missing.append(f"{modname}.{name}")
    pm = own_manager()
    for kind in KINDS:
        for comp in pm.registry(kind):
            docs = param_docs(comp.factory)
            for p in comp.params:
                if not docs.get(p):
                    missing.append(f"{kind} '{comp.name}' parameter '{p}'")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdtoolkit.cli.docgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the generated pages are out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in generate().items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            from kdtoolkit.foundation.io import atomic_write_text

            atomic_write_text(path, text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python -m kdtoolkit.cli.docgen): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
