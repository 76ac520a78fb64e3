"""Plugin discovery and the plugin manager.

Plugins are Python modules exposing ``@hookimpl`` functions (see
:mod:`kdtoolkit.plugin.hookspecs`). They are found through the ``kdt`` entry-point
group — the built-in bundles in ``plugins/`` register exactly as a
third-party package does.

Environment variables:

``KDT_DISABLE_PLUGIN_AUTOLOAD=1``
    Load no entry-point plugins except kdtoolkit's own built-in bundles.
``KDT_BLOCK_PLUGINS=name[,name...]``
    Do not load the named entry-point plugins (built-in bundles included).

A plugin that fails to import, or whose hook raises during registration, is
recorded as *failed* with its error; other commands keep working and
``kdt plugins`` shows the failure. This holds for ``SystemExit`` and
``GeneratorExit`` too (a plugin calling ``sys.exit()`` while it is imported
is *failed*, "called sys.exit(3) while being imported"); only
``KeyboardInterrupt`` goes through. What a plugin prints while it is imported
or registers goes to stderr, so that ``kdt plugins --json`` stays JSON.

The built-in bundles (entry points of the ``kdtoolkit`` distribution) are
registered before any other entry point: a third-party entry point named like
a built-in bundle, or a component named like a built-in one, is refused
(marked *failed*, naming both) and the built-in is kept.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from collections.abc import Iterator

import pluggy

from kdtoolkit.plugin import hookspecs
from kdtoolkit.foundation.errors import PluginError
from kdtoolkit.plugin.registry import HOOKS, KINDS, Registry, describe_exception, describe_raise

ENTRY_POINT_GROUP = "kdt"
AUTOLOAD_ENV = "KDT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "KDT_BLOCK_PLUGINS"
CORE_PLUGIN = "kdt.core"


@dataclass
class PluginInfo:
    """What is known about one plugin, for ``kdt plugins``."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    source: str | None = None
    status: str = "loaded"  # loaded | failed | blocked | disabled
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "hooks": self.hooks,
            "components": self.components,
            "warnings": self.warnings,
        }


@contextlib.contextmanager
def own_distribution_only():
    """Within the block, new plugin managers load only the ``kdtoolkit`` distribution's
    entry points (as ``KDT_DISABLE_PLUGIN_AUTOLOAD=1`` does); used to generate the docs."""
    before = {k: os.environ.get(k) for k in (AUTOLOAD_ENV, BLOCK_ENV)}
    os.environ[AUTOLOAD_ENV] = "1"
    os.environ.pop(BLOCK_ENV, None)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _short_error(exc: BaseException) -> str:
    return describe_exception(exc)


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    """The name of the distribution declaring entry point ``ep`` (``None`` if unknown)."""
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _is_own(distribution: str | None) -> bool:
    """Whether ``distribution`` is kdtoolkit itself (its entry points are the built-in bundles)."""
    return (distribution or "").strip().lower().replace("_", "-") == "kdtoolkit"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Within the block, what plugin code prints to ``sys.stdout`` goes to stderr (so
    that output meant for a pipe, such as ``kdt plugins --json``, stays clean); used
    around plugin imports, registration hooks and ``kdt_add_commands``."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class PluginManager:
    """kdtoolkit's wrapper around :class:`pluggy.PluginManager`.

    :param autoload: discover plugins from the ``kdt`` entry-point group
        (subject to the environment variables above).
    :param extra: ``(plugin object, name)`` pairs registered after discovery
        (tests use this to add throwaway plugins).
    """

    def __init__(self, *, autoload: bool = True, extra: list[tuple[Any, str]] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        from kdtoolkit.plugin import builtin

        self._register(
            builtin,
            CORE_PLUGIN,
            PluginInfo(CORE_PLUGIN, builtin.__name__, "kdtoolkit", _version("kdtoolkit"), "built-in"),
        )
        if autoload:
            self._discover()
        for obj, name in extra or []:
            self._register(
                obj, name, PluginInfo(name, getattr(obj, "__name__", repr(obj)), source="registered at run time")
            )
        self.registries: dict[str, Registry] = {}
        self._collect()

    # -- discovery ------------------------------------------------------
    def _discover(self) -> None:
        blocked = _blocked_names()
        no_autoload = _autoload_disabled()
        # kdtoolkit's own bundles first: a third-party entry point can never take a built-in's name
        # (the sort is stable, so other entry points keep importlib.metadata's order)
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: not _is_own(_dist_name(ep)))
        for ep in eps:
            dist = getattr(ep, "dist", None)
            dist_name = _dist_name(ep)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist_name,
                version=dist.version if dist is not None else None,
                source=f"entry point of {dist_name}" if dist_name else "entry point",
            )
            if ep.name in blocked:
                info.status = "blocked"
                self.infos[ep.name if ep.name not in self.infos else self._free_key(ep.name, dist_name or ep.value)] = (
                    info
                )
                continue
            if ep.name in self.infos:
                holder = self.infos[ep.name]
                kept = "the built-in bundle " if _is_own(holder.distribution) else ""
                info.status, info.error = (
                    "failed",
                    (
                        f"plugin name '{ep.name}' is already taken by {kept}{holder.module} (distribution "
                        f"{holder.distribution or 'unknown'}); entry point '{ep.name}' = {ep.value} of distribution "
                        f"{dist_name or 'unknown'} refused, rename it"
                    ),
                )
                self.infos[self._free_key(ep.name, dist_name or ep.value)] = info
                continue
            if no_autoload and (dist_name or "").lower() != "kdtoolkit":
                info.status = "disabled"
                self.infos[ep.name] = info
                continue
            try:
                with stdout_to_stderr():
                    obj = ep.load()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a broken plugin must not break the CLI
                info.status, info.error = "failed", _short_error(exc)
                self.infos[ep.name] = info
                continue
            except BaseException as exc:
                info.status, info.error = "failed", f"{describe_raise(exc)} while being imported"
                self.infos[ep.name] = info
                continue
            self._register(obj, ep.name, info)

    def _free_key(self, name: str, tag: str) -> str:
        """``"name (tag)"``, or with a number added: a key of :attr:`infos` not yet used."""
        key, n = f"{name} ({tag})", 2
        while key in self.infos:
            key, n = f"{name} ({tag}, {n})", n + 1
        return key

    def _is_builtin(self, name: str) -> bool:
        """Whether plugin ``name`` is kdtoolkit's own (``kdt.core`` or a bundle of the kdtoolkit distribution)."""
        info = self.infos.get(name)
        return name == CORE_PLUGIN or (info is not None and _is_own(info.distribution))

    def _register(self, obj: Any, name: str, info: PluginInfo) -> None:
        """Register ``obj`` as plugin ``name``; anything it raises meanwhile (its attributes are read)
        marks it failed instead."""
        try:
            with stdout_to_stderr():
                self._register_checked(obj, name, info)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if self.pm.get_plugin(name) is obj:
                    self.pm.unregister(obj)
            info.status, info.error = "failed", f"{describe_raise(exc)} while being registered"
            info.hooks = []
            held = self.infos.get(name)
            self.infos[name if held is None or held is info else self._free_key(name, info.module)] = info

    def _register_checked(self, obj: Any, name: str, info: PluginInfo) -> None:
        file = getattr(obj, "__file__", None)
        if file and info.source in (None, "registered at run time"):
            info.source = file
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            info.status, info.error = "failed", _short_error(exc)
            # never overwrite (and so disable) the plugin already holding the name
            self.infos[name if name not in self.infos else f"{name} ({info.module})"] = info
            return
        # Hook implementations that match no spec are typos: refuse the plugin.
        # (pluggy adds a spec-less caller to pm.hook for every unknown name it
        # has seen, so test for the spec, not for the attribute.)
        unknown = [
            h
            for h in dir(obj)
            if h.startswith("kdt_")
            and callable(getattr(obj, h))
            and getattr(getattr(self.pm.hook, h, None), "spec", None) is None
        ]
        if unknown:
            self.pm.unregister(obj)
            info.status = "failed"
            info.error = f"unknown hook(s) {', '.join(unknown)}; see docs/plugins.md for the hook names"
        else:
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(obj)
                info.status, info.error = "failed", _short_error(exc)
        if info.status == "loaded":
            info.hooks = sorted(h.name for h in self.pm.get_hookcallers(self.pm.get_plugin(name)) or [])
            # A function named like a hook but not decorated with @hookimpl is silently ignored by pluggy.
            plain = [
                h
                for h in dir(obj)
                if h.startswith("kdt_")
                and callable(getattr(obj, h))
                and h not in info.hooks
                and getattr(getattr(self.pm.hook, h, None), "spec", None) is not None
            ]
            if plain:
                info.warnings.append(
                    f"{', '.join(plain)} not decorated with @hookimpl, so never called "
                    "(from kdtoolkit.plugin.hookspecs import hookimpl)"
                )
        self.infos[name] = info

    # -- registries -----------------------------------------------------
    def _collect(self) -> None:
        for kind in KINDS:
            registry = Registry(kind)
            hook = getattr(self.pm.hook, HOOKS[kind])
            # registration order, kdtoolkit's own plugins first whatever a plugin's tryfirst/trylast say:
            # on a name clash the first keeps the name, so a built-in component is never displaced
            impls = sorted(hook.get_hookimpls(), key=lambda impl: not self._is_builtin(impl.plugin_name))
            for impl in impls:
                info = self.infos.get(impl.plugin_name)
                if info is not None and info.status != "loaded":
                    continue
                before = set(registry.names())
                try:
                    with stdout_to_stderr():
                        impl.function(registry=registry.bound(impl.plugin_name))
                except PluginError as exc:
                    self._fail(impl.plugin_name, exc.message, registry)
                    continue
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    self._fail(impl.plugin_name, f"{HOOKS[kind]} {describe_raise(exc)}", registry)
                    continue
                added = sorted(set(registry.names()) - before)
                if info is not None and added:
                    info.components.setdefault(kind, []).extend(added)
            self.registries[kind] = registry
        failed = [(i.name, i.error or i.status) for i in self.failed()]
        for registry in self.registries.values():
            registry.failed[:] = failed

    def _fail(self, name: str, error: str, current: Registry | None = None) -> None:
        info = self.infos.get(name)
        if info is not None:
            info.status, info.error = "failed", error
            info.components = {}
        # A failed plugin contributes nothing: drop what it registered before failing.
        for registry in [*self.registries.values(), *([current] if current is not None else [])]:
            registry.drop_owner(name)

    def registry(self, kind: str) -> Registry:
        """The registry of component ``kind`` (``backbone``, ``head``, ...)."""
        return self.registries[kind]

    # -- hooks ----------------------------------------------------------
    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call a collect-all hook; a plugin that raises is reported by name.

        ``SystemExit`` and ``GeneratorExit`` raised by a plugin are reported the
        same way (they never end the process); ``KeyboardInterrupt`` goes through, and so does a
        resource error (a full disk, out of memory: :func:`kdtoolkit.foundation.io.is_resource_error`), which the
        command line reports as one line naming the file.

        :raises PluginError: ``plugin 'x' failed in kdt_after_epoch: ...``
            (``...: called sys.exit(3)`` for a plugin that calls ``sys.exit``).
        """
        hook = getattr(self.pm.hook, hook_name)
        results = []
        for impl in reversed(hook.get_hookimpls()):
            args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
            try:
                res = impl.function(**args)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                from kdtoolkit.foundation.io import is_resource_error

                if is_resource_error(exc):  # a full disk in a plugin's writer: the CLI's resource-error line
                    raise
                raise PluginError(f"plugin '{impl.plugin_name}' failed in {hook_name}: {_short_error(exc)}") from exc
            if res is not None:
                results.append(res)
        return results

    def failed(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "failed"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_MANAGER: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, created (and plugins loaded) once."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def current_manager() -> PluginManager | None:
    """The process-wide plugin manager as it is now: ``None`` when none was made yet (nothing is loaded);
    what a test gives back to :func:`set_manager` once it is done."""
    return _MANAGER


def set_manager(manager: PluginManager | None) -> None:
    """Replace the process-wide manager (tests; ``None`` forces a reload)."""
    global _MANAGER
    _MANAGER = manager
