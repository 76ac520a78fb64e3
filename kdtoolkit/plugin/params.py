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

A component states the checks of its values beside its parameters, as data
the schema cache can keep (:class:`ParamChecks`: ``check_params =
ParamChecks(Range("temperature", gt=0))``), and a loss may name the parameters
that hold its taps (:class:`TapsFrom`); validation then reads both without
importing the component's module.
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


# --------------------------------------------------------------------------- declared checks


class Rule:
    """One declared check of a component's parameters (see :class:`ParamChecks`).

    :meth:`check` raises ``ValueError(key, message)``, the form a ``check_params`` function uses.
    The kinds the schema cache keeps as data are those of :data:`RULES`.
    """

    key: str

    def check(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError(key, message)`` when ``params`` break the rule."""
        raise NotImplementedError

    def describe(self) -> str:
        """The rule in a few words, for the components reference (``"> 0"``, ``"in [0, 1)"``)."""
        raise NotImplementedError


def _is_key(key: Any) -> bool:
    return isinstance(key, str) and bool(key)


@dataclass(frozen=True)
class Range(Rule):
    """A number parameter lies within bounds: ``Range("temperature", gt=0)``, ``Range("p", ge=0, lt=1)``.

    A value of ``None`` (an optional parameter left unset) passes. The message names the bounds as
    given: ``must be > 0, got -1.0``, ``must be >= 1, got 0``, ``must be in [0, 1), got 1.5``.

    :param key: the parameter.
    :param gt: exclusive lower bound.
    :param ge: inclusive lower bound.
    :param lt: exclusive upper bound.
    :param le: inclusive upper bound.
    """

    key: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self) -> None:
        if not _is_key(self.key):
            raise TypeError(f"Range: the key must be a parameter name, got {self.key!r}")
        bounds = (self.gt, self.ge, self.lt, self.le)
        if any(b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))) for b in bounds):
            raise TypeError(f"Range('{self.key}'): bounds must be numbers")
        if self.gt is not None and self.ge is not None or self.lt is not None and self.le is not None:
            raise TypeError(f"Range('{self.key}'): give at most one lower bound (gt or ge) and one upper (lt or le)")
        if all(b is None for b in bounds):
            raise TypeError(f"Range('{self.key}'): give a bound (gt, ge, lt or le)")

    def _inside(self, v: Any) -> bool:
        return (
            (self.gt is None or v > self.gt)
            and (self.ge is None or v >= self.ge)
            and (self.lt is None or v < self.lt)
            and (self.le is None or v <= self.le)
        )

    def check(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError(key, "must be ..., got v")`` when the value is out of bounds."""
        v = params[self.key]
        if v is not None and not self._inside(v):
            raise ValueError(self.key, f"must be {self.describe()}, got {v}")

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"<= 10"`` or ``"in [0, 1)"``."""
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        if lo is not None and hi is not None:
            return f"in {'(' if self.gt is not None else '['}{lo}, {hi}{')' if self.lt is not None else ']'}"
        if lo is not None:
            return f"{'>' if self.gt is not None else '>='} {lo}"
        return f"{'<' if self.lt is not None else '<='} {hi}"


@dataclass(frozen=True)
class NonEmpty(Rule):
    """A string, list or table parameter is not empty: ``NonEmpty("taps", "name at least one tap")``.

    A value of ``None`` (an optional parameter left unset) passes.

    :param key: the parameter.
    :param message: the error message (default ``"must not be empty"``).
    """

    key: str
    message: str = "must not be empty"

    def __post_init__(self) -> None:
        if not _is_key(self.key):
            raise TypeError(f"NonEmpty: the key must be a parameter name, got {self.key!r}")
        if not isinstance(self.message, str) or not self.message:
            raise TypeError(f"NonEmpty('{self.key}'): the message must be a non-empty string")

    def check(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError(key, message)`` when the value is empty."""
        v = params[self.key]
        if v is not None and not v:
            raise ValueError(self.key, self.message)

    def describe(self) -> str:
        """``"not empty"``."""
        return "not empty"


#: The rule kinds the schema cache keeps as data, by name (a subclass of one is not: it may check otherwise).
RULES: dict[str, type[Rule]] = {"Range": Range, "NonEmpty": NonEmpty}


class ParamChecks:
    """A component's ``check_params``, declared as rules: ``check_params = ParamChecks(Range("temperature", gt=0))``.

    Calling it with the parameters runs the rules in order; the first that fails raises
    ``ValueError(key, message)``, which validation reports as ``recipe.toml: <table>.<key>: message``,
    exactly as for a ``check_params`` function. A rule is a :class:`Range`, a :class:`NonEmpty` or a
    function ``f(params)`` for what they cannot say (a check across keys), raising as ``check_params``
    does.

    Rules of :data:`RULES` are kept as data in the schema cache (:mod:`kdtoolkit.plugin.schema_cache`),
    and a function as a reference to it: validating a recipe then imports neither the component's
    module (nor torch) nor anything but the modules of those functions. Every key a rule names must
    be a parameter of the factory (checked when the component is first read).

    :param rules: the rules, in the order they are checked.
    """

    def __init__(self, *rules: Rule | Callable[[dict[str, Any]], None]):
        for rule in rules:
            if not isinstance(rule, Rule) and not callable(rule):
                raise TypeError(f"ParamChecks: {rule!r} is neither a rule nor a function")
        self.rules = tuple(rules)

    def __call__(self, params: dict[str, Any]) -> None:
        for rule in self.rules:
            if isinstance(rule, Rule):
                rule.check(params)
            else:
                rule(params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamChecks) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"ParamChecks({', '.join(getattr(r, '__qualname__', None) or repr(r) for r in self.rules)})"

    def describe(self, key: str) -> list[str]:
        """What the declared rules say about parameter ``key`` (``["> 0"]``), for the components reference."""
        return [r.describe() for r in self.rules if isinstance(r, Rule) and r.key == key]

    def problem(self, params: dict[str, ParamSpec]) -> str | None:
        """Why these rules do not fit a factory with recipe parameters ``params`` (``None`` when they do)."""
        for rule in self.rules:
            if not isinstance(rule, Rule):
                continue
            spec = params.get(rule.key)
            if spec is None:
                return f"check_params: {type(rule).__name__} names '{rule.key}', which is not a parameter"
            if isinstance(rule, Range) and _is_optional(spec.annotation)[1] not in (int, float):
                return f"check_params: Range needs a number parameter, '{rule.key}' is {spec.type_name()}"
        return None


class TapsFrom:
    """A loss's ``requires_taps`` (or ``requires_teacher_taps``) read from its parameters:
    ``requires_taps = TapsFrom("student_tap")``.

    Called with the loss's parameters it returns the tap names they hold: a string parameter gives
    one name, a list gives its names, ``None`` gives none. Kept as data in the schema cache, so that
    a loss declaring its taps this way needs no separate torch-free module for validation.

    :param keys: the parameters naming taps.
    """

    def __init__(self, *keys: str):
        if not keys or not all(_is_key(k) for k in keys):
            raise TypeError(f"TapsFrom: give the names of the parameters that name taps, got {keys!r}")
        self.keys = tuple(keys)

    def __call__(self, params: dict[str, Any]) -> tuple[str, ...]:
        out: list[str] = []
        for key in self.keys:
            v = params[key]
            if v is not None:
                out += [v] if isinstance(v, str) else list(v)
        return tuple(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TapsFrom) and self.keys == other.keys

    def __hash__(self) -> int:
        return hash(self.keys)

    def __repr__(self) -> str:
        return f"TapsFrom({', '.join(repr(k) for k in self.keys)})"
