"""Lazy exports: a package's public names, imported from its modules on first use.

Every package of kdtoolkit exports its public API from ``__init__`` this way, so that importing a
package (``kdt --help``, recipe validation) imports no module, and no torch, until a name is used::

    _EXPORTS = {"Records": "records", ...}   # name -> module of this package
    __all__ = sorted(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], moved: dict[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    :param package: the package's ``__name__``.
    :param exports: public name → the module of ``package`` that defines it.
    :param moved: names that moved to another module (name → that module's full name): still
        served, for one more version, with a ``DeprecationWarning``.
    """
    moved = moved or {}

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        if name in moved:
            warnings.warn(
                f"{package}.{name} moved to {moved[name].rsplit('.', 1)[0]}.{name}; "
                "the old name goes in the next version",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
