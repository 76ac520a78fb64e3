"""Typed registries of components, with the owning plugin of every name.

A plugin receives a :class:`Registry` in its ``kdt_register_*`` hook and calls
:meth:`Registry.add`. The registry refuses a name registered twice (naming both
owners) and answers an unknown name with a "did you mean" suggestion and the
list of what is registered.

A component's recipe parameters are read from its factory's signature: every
keyword parameter with a type annotation becomes a recipe key, validated
before anything is built (see :mod:`kdtoolkit.params`).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PluginError, RecipeError
from .params import ParamSpec, signature_params

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

#: Plural of each kind, as in hook names and listings.
PLURALS = {kind: kind + ("es" if kind.endswith("s") else "s") for kind in KINDS}
#: The registration hook of each kind.
HOOKS = {kind: f"kdt_register_{PLURALS[kind]}" for kind in KINDS}


@dataclass
class Component:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    owner: str
    summary: str
    params: dict[str, ParamSpec] = field(default_factory=dict)

    def attr(self, name: str, default: Any = None) -> Any:
        """A class attribute of the factory (e.g. ``requires_teacher``)."""
        return getattr(self.factory, name, default)


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

    # -- registration -------------------------------------------------
    def bound(self, owner: str) -> "Registry":
        """A view of this registry whose :meth:`add` records ``owner``."""
        view = object.__new__(Registry)
        view.kind = self.kind
        view._items = self._items
        view._owner = owner
        return view

    def add(self, name: str, factory: Callable[..., Any], *, summary: str | None = None) -> None:
        """Register ``factory`` under ``name``.

        :param name: the name recipes use (``[a-z0-9_.-]``, unique per kind).
        :param factory: a class or function building the component; its
            annotated keyword parameters are the component's recipe keys.
        :param summary: one line shown by ``kdt plugins`` (default: the first
            paragraph of the factory's docstring).
        :raises PluginError: when the name is taken (naming both owners) or
            the factory's signature cannot be used.
        """
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_.-" for c in name):
            raise PluginError(f"plugin '{self._owner}' registered an invalid {self.kind} name {name!r}")
        if name in self._items:
            first = self._items[name].owner
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{first}' and by plugin '{self._owner}'"
            )
        try:
            params = signature_params(factory, skip=RESERVED_ARGS[self.kind])
        except TypeError as exc:
            raise PluginError(f"plugin '{self._owner}': {self.kind} '{name}': {exc}") from None
        self._items[name] = Component(
            kind=self.kind,
            name=name,
            factory=factory,
            owner=self._owner,
            summary=summary if summary is not None else _summary(factory),
            params=params,
        )

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

        :raises RecipeError: naming ``source``/``key``, with a suggestion and
            the registered names, when there is none.
        """
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "none"
            raise RecipeError(
                f"unknown {self.kind} {name!r}{suggest(str(name), self.names())}; registered: {known}",
                source=source,
                key=key,
            ) from None
