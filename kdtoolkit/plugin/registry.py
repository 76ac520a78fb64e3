"""Typed registries of components, with the owning plugin of every name.

A plugin receives a :class:`Registry` in its ``kdt_register_*`` hook and calls
:meth:`Registry.add`. The registry refuses a name registered twice (naming both
owners) and answers an unknown name with a "did you mean" suggestion and the
list of what is registered.

A component's recipe parameters are read from its factory's signature: every
keyword parameter with a type annotation becomes a recipe key, validated
before anything is built (see :mod:`kdtoolkit.plugin.params`).

A factory may be registered as a reference, ``"package.module:Name"``: its
module is imported only when the component is first validated or built, so
listing plugins (``kdt plugins``, ``kdt --help``) imports neither torch nor
the plugin's components. The built-in bundles all register this way. Once a
referenced component has been read, its schema (parameters, the class
attributes validation reads, where its ``check_params`` lives) is kept in
the per-user schema cache (:mod:`kdtoolkit.plugin.schema_cache`): checking a recipe
later imports only the modules of the ``check_params`` it calls.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import time
from typing import Any
from collections.abc import Callable

from kdtoolkit.foundation.errors import KdtError, PluginError, RecipeError
from kdtoolkit.plugin.params import ParamChecks, ParamSpec, signature_params

#: Positional arguments the core passes itself, per component kind; they are
#: not recipe keys.
RESERVED_ARGS: dict[str, tuple[str, ...]] = {
    "backbone": ("num_classes",),
    "head": ("in_channels", "num_classes"),
    "loss": (),
    "metric": (),
    "dataset": ("split", "augment"),
    "phase": (),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "epochs"),
}

KINDS = tuple(RESERVED_ARGS)

#: Keys the core reads itself in a component's recipe table, per kind: a
#: factory parameter with one of these names would never receive its value,
#: so it is refused (a plugin registering the class fails; a reference fails
#: on first use).
RESERVED_KEYS: dict[str, tuple[str, ...]] = {
    "backbone": ("name",),
    "head": ("name",),
    "loss": ("name", "id", "weight"),
    "metric": ("name",),
    "dataset": ("dataset", "batch_size", "eval_batch_size", "num_workers", "drop_last", "augment"),
    "phase": ("name", "kind"),
    "optimizer": ("name", "weight_decay"),
    "scheduler": ("name", "warmup_epochs", "warmup_start_factor"),
}

#: When this process started using components: a kept schema is written only from source files
#: older than this (a file edited later may differ from the module imported).
_STARTED_NS = time.time_ns()

#: Longest list of names an error message spells out (the rest is summarised).
LIST_LIMIT = 20


def summarize(names: list[str], limit: int = LIST_LIMIT, hint: str = "see kdt plugins") -> str:
    """``"a, b, c"``, or the first ``limit`` names and ``"… and N more; <hint>"``: never cut mid-list."""
    if len(names) <= limit:
        return ", ".join(names) or "none"
    return ", ".join(names[:limit]) + f", … and {len(names) - limit} more; {hint}"


#: Plural of each kind, as in hook names and listings.
PLURALS = {kind: kind + ("es" if kind.endswith("s") else "s") for kind in KINDS}
#: The registration hook of each kind.
HOOKS = {kind: f"kdt_register_{PLURALS[kind]}" for kind in KINDS}


#: A factory reference: ``package.module:Name`` (``Name`` may be dotted).
REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class Component:
    """One registered component.

    :ivar kind: the component kind (``head``, ``loss``, ...).
    :ivar name: the name recipes use.
    :ivar owner: the plugin that registered it.
    :ivar reference: ``"module:Name"`` when registered lazily, else ``None``.

    :attr:`factory`, :attr:`params` and :attr:`summary` import a lazily
    registered factory on first access; an import or signature failure
    raises :class:`PluginError` naming the plugin, the component and the
    reference.
    """

    def __init__(self, kind: str, name: str, factory: Callable[..., Any] | str, owner: str, summary: str | None = None):
        self.kind, self.name, self.owner = kind, name, owner
        self.reference = factory if isinstance(factory, str) else None
        self._factory = None if isinstance(factory, str) else factory
        self._params: dict[str, ParamSpec] | None = None
        self._summary = summary
        self._schema: dict[str, Any] | None = None  # from the schema cache, for a reference not imported
        if self._factory is not None:
            self._read_params()

    def _fail(self, what: str) -> PluginError:
        return PluginError(f"plugin '{self.owner}': {self.kind} '{self.name}': {what}")

    @property
    def factory(self) -> Callable[..., Any]:
        """The class or function that builds the component (imported on first use)."""
        if self._factory is None:
            assert self.reference is not None  # registered by reference, or given a factory
            module_name, _, attr = self.reference.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                raise self._fail(f"cannot import {self.reference} ({describe_exception(exc)})") from None
            if not callable(obj):
                raise self._fail(f"{self.reference} is not a class or function")
            self._factory = obj
            self._read_params()
            from kdtoolkit.plugin.schema_cache import schema_cache

            cache = schema_cache()
            if cache.get(self.reference) is None:  # read from the module itself: kept for the next process
                assert self._params is not None  # read by _read_params
                cache.put(self.reference, obj, self._params, since_ns=_STARTED_NS)
        return self._factory

    def _cached_schema(self) -> dict[str, Any] | None:
        """The schema kept for this reference, if the factory is not imported and one is current."""
        if self._factory is not None or self.reference is None:
            return None
        if self.reference.partition(":")[0] in sys.modules:  # imported already: read the module itself
            return None
        if self._schema is None:
            from kdtoolkit.plugin.schema_cache import schema_cache

            self._schema = schema_cache().get(self.reference)
        return self._schema

    def _read_params(self) -> None:
        assert self._factory is not None
        try:
            params = signature_params(self._factory, skip=RESERVED_ARGS[self.kind])
        except (TypeError, ValueError) as exc:  # ValueError: no signature (a built-in callable)
            self._factory = None if self.reference else self._factory
            raise self._fail(str(exc)) from None
        clash = [p for p in params if p in RESERVED_KEYS[self.kind]]
        if clash:
            self._factory = None if self.reference else self._factory
            raise self._fail(
                f"parameter '{clash[0]}' is a key the core reads itself in every {self.kind}'s table "
                f"({', '.join(RESERVED_KEYS[self.kind])}), so it would never reach the {self.kind}: "
                "rename it"
            )
        checks = getattr(self._factory, "check_params", None)
        problem = checks.problem(params) if isinstance(checks, ParamChecks) else None
        if problem:
            self._factory = None if self.reference else self._factory
            raise self._fail(problem)
        self._params = params

    @property
    def params(self) -> dict[str, ParamSpec]:
        """The recipe parameters, read from the factory's signature (or from its kept schema)."""
        if self._params is None:
            schema = self._cached_schema()
            if schema is not None:
                self._params = schema["params"]
            else:
                self.factory  # noqa: B018 -- resolves and reads the signature
        assert self._params is not None  # read with the factory
        return self._params

    @property
    def summary(self) -> str:
        """One line for listings: given at registration, or the factory's docstring."""
        if self._summary is None:
            self._summary = _summary(self.factory)
        return self._summary

    @property
    def loaded(self) -> bool:
        """Whether the factory has been imported."""
        return self._factory is not None

    def build(self, /, *args: Any, **kwargs: Any) -> Any:
        """Call the factory with ``args`` and ``kwargs`` and return what it builds.

        A :class:`~kdtoolkit.foundation.errors.KdtError` raised by the factory (its own
        one-line error, e.g. a dataset's ``DataError``), ``KeyboardInterrupt``
        and resource errors (:func:`kdtoolkit.foundation.io.is_resource_error`: out of memory, a full disk) pass
        unchanged; any other exception, ``SystemExit``
        included, becomes one :class:`PluginError` naming the plugin and the
        component: ``plugin 'x': loss 'y': cannot be built: ValueError: ...``.
        """
        factory = self.factory
        try:
            return factory(*args, **kwargs)
        except (KdtError, KeyboardInterrupt):
            raise
        except BaseException as exc:
            from kdtoolkit.foundation.io import is_resource_error

            if is_resource_error(exc):  # out of memory, a full disk: the command line's resource-error line
                raise
            raise self._fail(f"cannot be built: {describe_exception(exc)}") from exc

    def attr(self, name: str, default: Any = None) -> Any:
        """A class attribute of the factory (e.g. ``requires_teacher``; those validation reads
        come from the kept schema when the factory is not imported)."""
        from kdtoolkit.plugin.schema_cache import SCHEMA_ATTRS

        schema = self._cached_schema() if name in SCHEMA_ATTRS else None
        if schema is not None:
            return schema["attrs"].get(name, default)
        return getattr(self.factory, name, default)

    def check_params(self) -> Callable[[dict], None] | None:
        """The factory's ``check_params`` (``None`` without one); with a kept schema, rebuilt from its
        data when declared as :class:`~kdtoolkit.plugin.params.ParamChecks`, else imported from the module
        that defines it, without importing the factory's module."""
        schema = self._cached_schema()
        if schema is not None:
            if schema.get("checks") is not None:
                return schema["checks"]
            if schema["check"] is None:
                return None
            from kdtoolkit.plugin.schema_cache import import_reference

            try:
                return import_reference(schema["check"])
            except Exception:  # moved or renamed since: read it from the factory
                self._schema = None
        return getattr(self.factory, "check_params", None)


def describe_exception(exc: BaseException) -> str:
    """One line (at most 300 characters) for an exception raised by plugin code:
    ``ValueError: message``, or ``called sys.exit(3)`` for a ``SystemExit``."""
    if isinstance(exc, SystemExit):
        text = f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def describe_raise(exc: BaseException) -> str:
    """What plugin code did, for a message that names the code first: ``raised ValueError: ...``,
    or ``called sys.exit(3)``."""
    text = describe_exception(exc)
    return text if isinstance(exc, SystemExit) else f"raised {text}"


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def suggest(name: str, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """Components of one kind (``backbone``, ``head``, ``loss``, ...).

    Plugins see a view bound to their own name (:meth:`bound`), so every
    entry records its owner.
    """

    def __init__(self, kind: str):
        if kind not in RESERVED_ARGS:
            raise ValueError(f"unknown component kind {kind!r}")
        self.kind = kind
        self._items: dict[str, Component] = {}
        self._owner = "<core>"
        #: ``(plugin, error)`` of every plugin that failed to load, named in "unknown" messages.
        self.failed: list[tuple[str, str]] = []

    # -- registration -------------------------------------------------
    def bound(self, owner: str) -> Registry:
        """A view of this registry whose :meth:`add` records ``owner``."""
        view = object.__new__(Registry)
        view.kind = self.kind
        view._items = self._items
        view._owner = owner
        view.failed = self.failed
        return view

    def add(self, name: str, factory: Callable[..., Any] | str, *, summary: str | None = None) -> None:
        """Register ``factory`` under ``name``.

        :param name: the name recipes use (``[a-z0-9_.-]``, unique per kind).
        :param factory: a class or function building the component, or a
            reference to one, ``"package.module:Name"``, imported when the
            component is first validated or built (the convention: see
            ``docs/plugins.md``, "Fast start-up"); its annotated keyword
            parameters are the component's recipe keys.
        :param summary: one line shown in listings (default: the first
            paragraph of the factory's docstring).
        :raises PluginError: when the name is taken (naming both owners), the
            reference is malformed or the factory's signature cannot be used.
        """
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_.-" for c in name):
            raise PluginError(f"plugin '{self._owner}' registered an invalid {self.kind} name {name!r}")
        if name in self._items:
            first = self._items[name].owner
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{first}' and by plugin '{self._owner}' "
                f"(the first keeps the name)"
            )
        if isinstance(factory, str) and not REFERENCE.match(factory):
            raise PluginError(
                f"plugin '{self._owner}': {self.kind} '{name}': {factory!r} is not a reference "
                "of the form 'package.module:Name'"
            )
        if not isinstance(factory, str) and not callable(factory):
            raise PluginError(
                f"plugin '{self._owner}': {self.kind} '{name}': the factory must be a class, "
                f"a function or a 'package.module:Name' reference, got {type(factory).__name__}"
            )
        self._items[name] = Component(self.kind, name, factory, self._owner, summary)

    def drop_owner(self, owner: str) -> list[str]:
        """Remove every component registered by plugin ``owner`` (one that failed)."""
        names = [n for n, c in self._items.items() if c.owner == owner]
        for n in names:
            del self._items[n]
        return names

    # -- lookup -------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str, *, source: str | None = None, key: str | None = None) -> Component:
        """The component called ``name``.

        :raises RecipeError: naming ``source``/``key``, with a suggestion, the
            registered names (summarised beyond :data:`LIST_LIMIT`) and every
            plugin that failed to load, when there is none.
        """
        try:
            return self._items[name]
        except (KeyError, TypeError):
            failed = ""
            if self.failed:
                failed = (
                    "; plugins that failed to load: "
                    + "; ".join(f"'{plugin}' ({error})" for plugin, error in self.failed)
                    + " (see kdt plugins)"
                )
            raise RecipeError(
                f"unknown {self.kind} {name!r}{suggest(str(name), self.names())}; registered: "
                f"{summarize(self.names())}{failed}",
                source=source,
                key=key,
            ) from None
