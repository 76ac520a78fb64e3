"""timm's model names, for validating a recipe without importing timm.

Importing timm imports torchvision and ``torch._dynamo`` (about 2 s on a
2-core CPU), which a recipe check does not otherwise need. The names of the
installed timm's architectures are therefore listed once, by importing timm,
and kept in a small JSON file keyed by timm's version:
``$KDT_CACHE_DIR`` or ``$XDG_CACHE_HOME/kdtoolkit`` (default
``~/.cache/kdtoolkit``), ``timm-<version>-models-v2.json``. A cache that cannot be
read is rebuilt; one that cannot be written is skipped (the names are then
listed by timm each time).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from importlib import metadata
from pathlib import Path

CACHE_ENV = "KDT_CACHE_DIR"


def cache_dir() -> Path:
    """Where kdtoolkit keeps small per-user caches."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kdtoolkit"


def _timm_version() -> str:
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _from_timm() -> list[str]:
    """Every name ``timm.is_model`` accepts: the listed architectures and the deprecated
    names timm still builds (mapped to their new names)."""
    import timm

    names = set(timm.list_models())
    try:
        from timm.models._registry import _deprecated_models

        names.update(_deprecated_models)
    except ImportError:  # another timm layout: the listed names only
        pass
    return sorted(names)


def model_names() -> list[str]:
    """Every model name the installed timm accepts (``timm.list_models()`` and its deprecated names)."""
    version = _timm_version()
    path = cache_dir() / f"timm-{version}-models-v2.json"
    try:
        data = json.loads(path.read_text())
        if data.get("timm") == version and isinstance(data.get("models"), list) and data["models"]:
            return data["models"]
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    names = _from_timm()
    from kdtoolkit.foundation import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"timm": version, "models": names}))
    except OSError:  # a cache: not written is only slower next time
        pass
    return names


def arch_name(name: str) -> str:
    """The architecture of a model name, without its pretrained tag (``resnet50.a1_in1k`` → ``resnet50``),
    as timm's ``is_model`` reads it."""
    return name.split(".", 1)[0]


def is_model(name: str) -> bool:
    """Whether timm has the architecture of ``name`` (as ``timm.is_model``)."""
    return arch_name(name) in set(model_names())


def similar(name: str, n: int = 5) -> list[str]:
    """Close names for an unknown one: spelling neighbours first, then names sharing its first word."""
    names = model_names()
    arch = arch_name(name)
    close = difflib.get_close_matches(arch, names, n=n, cutoff=0.75)
    stem = arch.split("_")[0]
    for other in fnmatch.filter(names, f"*{stem}*"):
        if len(close) >= n:
            break
        if other not in close:
            close.append(other)
    return close[:n]
