"""Recipe parameters read from a component factory's signature.

A factory such as::

    def digits(split, augment=False, *, image_size: int = 32, normalize: bool = True): ...

declares the recipe keys ``image_size`` (an integer, default 32) and
``normalize``. Supported annotations: ``int``, ``float``, ``bool``, ``str``,
``list[T]`` of those, ``T | None``, ``typing.Literal[...]``,
``dict[str, T]`` and ``pathlib.Path`` (a string naming an existing file or
folder, checked during validation; a relative one is resolved against the
recipe's folder first, see ``docs/recipes.md``). An ``int`` is accepted where a ``float`` is asked for, a
``bool`` never counts as a number, and ``"inf"`` strings are not numbers (use
``inf`` in TOML).
"""

from __future__ import annotations

import inspect
import math
import os
import pathlib
import types
import typing
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class ParamSpec:
    """One recipe key of a component."""

    name: str
    annotation: Any
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_name(self) -> str:
        return type_name(self.annotation)


def signature_params(factory: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, ParamSpec]:
    """The recipe parameters of ``factory`` (keyword parameters minus ``skip``).

    :raises TypeError: if a parameter lacks a supported annotation or the
        factory takes ``*args``/``**kwargs``.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:  # unresolved forward references
        raise TypeError(f"cannot read type annotations: {exc}") from None
    out: dict[str, ParamSpec] = {}
    for name, p in sig.parameters.items():
        if name in skip or name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"'{name}': *args/**kwargs cannot be validated; declare each parameter")
        ann = hints.get(name, REQUIRED)
        if ann is REQUIRED:
            raise TypeError(f"parameter '{name}' has no type annotation")
        type_name(ann)  # raises for unsupported annotations
        out[name] = ParamSpec(name, ann, p.default)
    return out


def _origin(ann: Any) -> Any:
    return typing.get_origin(ann)


def _is_optional(ann: Any) -> tuple[bool, Any]:
    origin = _origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(ann)) == 2:
            return True, args[0]
        raise TypeError(f"unsupported union annotation {ann!r}")
    return False, ann


def type_name(ann: Any) -> str:
    """A human name for a supported annotation ("a number", "a list of strings")."""
    optional, inner = _is_optional(ann)
    if optional:
        return type_name(inner) + " or none"
    if ann is bool:
        return "true or false"
    if ann is int:
        return "an integer"
    if ann is float:
        return "a number"
    if ann is str:
        return "a string"
    origin = _origin(ann)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin is list:
        (item,) = typing.get_args(ann) or (Any,)
        return "a list of " + (
            type_name(item).removeprefix("a ").removeprefix("an ") + "s" if item is not Any else "values"
        )
    if origin is dict:
        args = typing.get_args(ann)
        return "a table of " + (type_name(args[1]).removeprefix("a ").removeprefix("an ") + "s" if args else "values")
    if ann is Any:
        return "any value"
    if ann is pathlib.Path:
        return "a path to an existing file or folder"
    raise TypeError(f"unsupported annotation {ann!r}")


def is_path_annotation(ann: Any) -> bool:
    """Whether ``ann`` is ``pathlib.Path`` or ``pathlib.Path | None`` (a recipe value that names a file)."""
    try:
        return _is_optional(ann)[1] is pathlib.Path
    except TypeError:
        return False


#: The range of recipe integers: TOML's 64-bit signed integers (a larger one is refused at validation).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

# Upper bounds of core recipe keys, checked by ``kdt validate`` (documented in docs/recipes.md).
#: The largest seed (top-level ``seed``, ``seeds`` items, a stage's ``seed``): what a 64-bit
#: generator seed (``torch.manual_seed``) and a TOML integer hold; derived seeds are 63-bit hashes.
MAX_SEED = 2**63 - 1
#: The largest ``batch_size`` and ``eval_batch_size`` (and a phase's ``accumulate``).
MAX_BATCH_SIZE = 65536
#: The largest ``num_workers`` (worker processes loading data).
MAX_NUM_WORKERS = 256
#: The largest ``epochs`` of a phase (and ``warmup_epochs``).
MAX_EPOCHS = 1_000_000
#: The most memory one batch of input images may take, estimated at validation from the dataset's
#: ``image_size`` (when it has one) as ``batch × 3 × image_size² × 4`` bytes (float32 RGB).
MAX_INPUT_BATCH_BYTES = 16 * 2**30


def describe_value(value: Any) -> str:
    """How a value reads in an error message (strings quoted, TOML spellings; a huge integer by its size)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class ParamTypeError(ValueError):
    """A value does not match its annotation; ``path_suffix`` locates it."""

    def __init__(self, message: str, path_suffix: str = ""):
        super().__init__(message)
        self.path_suffix = path_suffix


def coerce(value: Any, ann: Any) -> Any:
    """Check ``value`` against ``ann`` and return it normalised.

    :raises ParamTypeError: with "expected ..., got ..." and, for lists, the
        index of the offending item.
    """
    optional, inner = _is_optional(ann)
    if optional:
        if value is None:
            return None
        return coerce(value, inner)
    if ann is Any:
        return value
    bad = ParamTypeError(f"expected {type_name(ann)}, got {describe_value(value)}")
    if ann is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if ann is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not INT_MIN <= value <= INT_MAX:
            raise ParamTypeError(
                f"expected an integer between -2^63 and 2^63-1 (TOML's 64-bit range), got {describe_value(value)}"
            )
        return value
    if ann is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:
            raise ParamTypeError(f"expected a number, got {describe_value(value)}, too large for a float") from None
        if math.isnan(value):
            raise ParamTypeError("expected a number, got nan")
        return value
    if ann is str:
        if not isinstance(value, str):
            raise bad
        return value
    if ann is pathlib.Path:
        if not isinstance(value, str) or not value:
            raise bad
        if not os.path.exists(value):
            raise ParamTypeError(f"no such file or folder: {value}")
        return value
    origin = _origin(ann)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(ann)):
            raise ParamTypeError(f"expected {type_name(ann)}, got {describe_value(value)}")
        return value
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise bad
        return _coerce_items(value, ann)
    raise TypeError(f"unsupported annotation {ann!r}")


def _coerce_items(value: list | dict, ann: Any) -> list | dict:
    """The items of a list or the values of a table, each checked against its annotation."""
    args = typing.get_args(ann)
    if isinstance(value, list):
        item = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(coerce(v, item))
            except ParamTypeError as exc:
                raise ParamTypeError(str(exc), f"[{i}]{exc.path_suffix}") from None
        return out
    vt = args[1] if args else Any
    out_d = {}
    for k, v in value.items():
        try:
            out_d[k] = coerce(v, vt)
        except ParamTypeError as exc:
            raise ParamTypeError(str(exc), f".{k}{exc.path_suffix}") from None
    return out_d
