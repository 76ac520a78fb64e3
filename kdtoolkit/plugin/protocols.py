"""Typed contracts of the component kinds: what the core reads from a component and calls on it.

One :class:`typing.Protocol` per kind a plugin registers with a class or an object the core uses
directly: :class:`BackboneProtocol`, :class:`HeadProtocol`, :class:`LossProtocol`,
:class:`MetricProtocol`, :class:`DatasetProtocol` and :class:`PhaseProtocol` (:data:`PROTOCOLS`).
Optimisers and schedules are torch's own objects (see the hooks ``kdt_register_optimizers`` and
``kdt_register_schedulers``); the prototype-head protocol, shared by the prototype architectures
and methods, belongs to the ``kdt_prototypes`` bundle (``kdt_prototypes.protocol``).

Each protocol documents its members once, with their types:

- **class attributes** (``ClassVar``), with the default the core assumes when a component does not
  define one. Those recipe validation (and ``kdt report``) reads
  (:data:`~kdtoolkit.plugin.schema_cache.SCHEMA_ATTRS`) are read from the registered class before
  anything is built, and kept in the schema cache, so they must be plain values (a tuple, a bool,
  a table), or :class:`~kdtoolkit.plugin.params.TapsFrom`, or a named function;
- **instance attributes**, read from a built component (a default marks an optional one);
- **methods**: required, or optional (marked :func:`optional`; the core calls them when present).

Every kind may also define ``check_params`` (:class:`ComponentProtocol`). A component need not
subclass a protocol: the contract is structural. The protocols serve as documentation (the API
reference renders them), as static types for plugin code, and as runtime checks through
:func:`protocol_problems`. They are not ``runtime_checkable``: ``isinstance`` would demand every optional
attribute too.

Importing this module imports no torch (the types of tensors, models and steps are imported only
for type checkers).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, TypeVar, Union

if TYPE_CHECKING:
    import torch

    from kdtoolkit.plugin.contracts import Model, Step

#: How a loss declares the taps it reads (``requires_taps``, ``requires_teacher_taps``): a tuple of
#: tap names, one name, or a function of the loss's recipe parameters returning the names (e.g.
#: :class:`~kdtoolkit.plugin.params.TapsFrom`).
TapNames: TypeAlias = tuple[str, ...] | str | Callable[[dict[str, Any]], Sequence[str]]

_F = TypeVar("_F", bound=Callable[..., Any])


def optional(method: _F) -> _F:
    """Mark a protocol method as optional: the core calls it only when the component defines it."""
    method.__kdt_optional__ = True  # type: ignore[attr-defined]
    return method


class ComponentProtocol(Protocol):
    """What every component kind may define: the check of its recipe parameters."""

    check_params: ClassVar[Callable[[dict[str, Any]], None] | None] = None
    """Called during validation with every recipe parameter, defaults filled in; raises
    ``ValueError(key, message)`` to blame one key or ``ValueError(message)`` for the whole table. A
    static method, or rules declared as data (``ParamChecks(Range("temperature", gt=0))``) that the
    schema cache keeps, so that validation imports neither the component's module nor torch."""


class StepHooks(Protocol):
    """The per-step hooks of the training loop (:mod:`kdtoolkit.engine.loop`): a backbone, a head, a
    phase's active losses and a phase kind that trains may define them."""

    @optional
    def on_epoch_start(self, state: Any) -> None:
        """Called before the first batch of every epoch with the loop's ``TrainState``
        (:class:`kdtoolkit.engine.loop.TrainState`); not when a run resumes within an epoch."""

    @optional
    def on_optimizer_step(self, state: Any) -> None:
        """Called after every optimiser step with the loop's ``TrainState``; ``state.steps`` holds
        the micro-batches (:class:`~kdtoolkit.plugin.contracts.Step`) accumulated into it."""


class BackboneProtocol(ComponentProtocol, StepHooks, Protocol):
    """A backbone: ``factory(**params)`` (plus ``num_classes=K`` when its signature has it) builds an
    ``nn.Module`` mapping images ``[B,3,S,S]`` to a feature map ``[B,C,H,W]``, or to logits ``[B,K]``
    for a whole classifier (used with the ``identity`` head)."""

    out_channels: int
    """``C``, the channels of the feature map (``K`` for a whole classifier): the head's
    ``in_channels``."""

    reduction: int | None
    """The stride ``S/H`` of the feature map (``None`` for a whole classifier); read by plugins
    (receptive fields), not by the core."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,S,S]`` to features ``[B,C,H,W]`` (or logits ``[B,K]``)."""
        ...


class HeadProtocol(ComponentProtocol, StepHooks, Protocol):
    """A head: ``factory(in_channels, num_classes, **params)`` builds an ``nn.Module`` mapping the
    backbone's features to a dict of outputs with at least ``"logits"`` ``[B,K]``."""

    outputs: ClassVar[tuple[str, ...]] = ("logits",)
    """The names of the outputs ``forward`` returns; a loss or phase whose ``requires_outputs`` names
    another is a recipe error."""

    param_groups: ClassVar[tuple[str, ...]] = ()
    """Sub-modules selectable as ``head.<name>`` in a phase's ``groups`` and in
    ``init_from_teacher``."""

    record_keys: ClassVar[tuple[str, ...]] = ()
    """Outputs saved per test image in the evaluation records, beside ``logits`` and ``labels``; a
    metric whose ``requires_records`` names another is a recipe error."""

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs for the backbone's features: a dict with ``"logits"`` and every name of
        ``outputs``."""
        ...

    @optional
    def record_meta(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """JSON values added to the evaluation records' metadata, from the first evaluated batch's
        outputs (a prototype head returns its latent grid ``{"H": h, "W": w}``)."""
        ...

    @optional
    def top_prototypes(self, outputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """The ``k`` prototypes that explain each prediction, for ``kdt predict``: ``[B, k]`` tensors
        ``prototype`` and ``similarity``, and where they apply ``class``, ``contribution`` and
        ``location``."""
        ...


class LossProtocol(ComponentProtocol, StepHooks, Protocol):
    """A loss: ``factory(**params)`` builds a callable ``loss(step) -> scalar tensor``, or an
    ``nn.Module`` whose parameters (selectable as ``loss.<id>`` in phase groups) and buffers are
    trained and saved in checkpoints. A declaration set on the instance overrides the class's
    (when a parameter decides what is read)."""

    requires_teacher: ClassVar[bool] = False
    """The stage must name a teacher (unless the loss's weight is 0)."""

    requires_outputs: ClassVar[tuple[str, ...]] = ()
    """The student head's outputs the loss reads; the head must declare them in ``outputs``."""

    requires_teacher_outputs: ClassVar[tuple[str, ...] | None] = None
    """The teacher's outputs the loss reads from ``step.teacher_outputs`` (``()``: none). ``None``
    (undeclared) means every output when ``requires_teacher`` is true: the teacher runs its forward
    pass and a teacher cache keeps every output."""

    requires_taps: ClassVar[TapNames] = ()
    """The student taps the loss reads from ``step.features``; the stage's ``model.taps`` must
    declare them."""

    requires_teacher_taps: ClassVar[TapNames] = ()
    """The teacher taps the loss reads from ``step.teacher_features``; the stage's ``teacher_taps``
    must declare them."""

    requires_labels: ClassVar[bool] = True
    """The loss reads ``step.targets``: the dataset must provide labels (``provides_labels``)."""

    requires_indices: ClassVar[bool] = False
    """The loss reads ``step.indices``, the dataset indices of the batch's images."""

    def __call__(self, step: Step) -> torch.Tensor:
        """The loss of one batch, a scalar tensor; the engine multiplies it by the recipe's ``weight``."""
        ...

    @optional
    def setup(self, probe: Step) -> None:
        """Build connectors from a dry forward pass (eval mode, no gradients) before the optimiser
        exists; ``probe.num_train`` is the number of training images. Raise ``ValueError`` for
        models it cannot serve."""

    @optional
    def check_models(self, model: Model, teacher: Model | None) -> None:
        """Called once per stage with the built models, before anything trains; raise
        ``ValueError(message)`` to refuse an incompatible pair."""


class MetricProtocol(ComponentProtocol, Protocol):
    """A metric: ``factory(**params)`` builds a callable ``metric(records, reference) -> dict`` over
    evaluation records."""

    requires_reference: ClassVar[bool] = False
    """The metric compares with a reference model's records (the stage's teacher, its
    ``compare_to`` stage, or else the stage itself)."""

    requires_records: ClassVar[tuple[str, ...]] = ()
    """The record keys the metric reads; besides ``logits`` and ``labels``, the head must declare
    them in ``record_keys``."""

    threshold_tables: ClassVar[dict[str, dict[str, str]] | None] = None
    """Result keys that hold a table keyed by a threshold's value (``"0.1"``, ``"inf"``), which
    ``kdt report`` draws against the threshold: key → ``{"title", "symbol", "label"}`` of the figure."""

    def __call__(self, records: Any, reference: Any) -> dict[str, Any]:
        """The metric's results from the stage's records and the reference's (or ``None``), both
        :class:`kdtoolkit.results.records.Records`; merged into the stage's result."""
        ...


class DatasetProtocol(ComponentProtocol, Protocol):
    """A dataset: ``factory(split, augment, **params)`` with ``split`` ``"train"`` or ``"test"``
    builds a map-style dataset of ``(image [3,S,S] float tensor, label int)``."""

    provides_labels: ClassVar[bool] = True
    """The items carry real labels; a loss with ``requires_labels`` refuses a dataset without them."""

    classes: Sequence[str]
    """The class names, in label order."""

    num_classes: int
    """The number of classes."""

    name: str
    """Stored in the records' metadata (records of different datasets are not compared)."""

    special_files: Sequence[str] = ()
    """Paths found where images lie that are not regular files, skipped; ``kdt check`` reports them."""

    samples: Sequence[tuple[str, int]] | None = None
    """``(file, label)`` per item: ``kdt check`` names a bad item by its file."""

    image_size: int = 224
    """The side of the images: ``kdt export``'s example input when the split is empty."""

    def __len__(self) -> int:
        """The number of items."""
        ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index``: the image ``[3,S,S]`` and its label."""
        ...

    @optional
    def preprocess(self, image: Any) -> torch.Tensor:
        """One decoded RGB PIL image to the tensor the test split would give (``kdt predict``)."""
        ...

    @optional
    def check_item(self, index: int) -> None:
        """Read item ``index`` as cheaply as possible; raise ``DataError`` naming its file when it
        cannot be read (``kdt check``)."""

    @optional
    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The collated batch of ``indices``, exactly as collating the items would give, drawing the
        same random numbers (used without worker processes)."""
        ...


class PhaseProtocol(ComponentProtocol, StepHooks, Protocol):
    """A phase kind: ``factory(**params)`` with the phase's own recipe parameters builds an object
    that runs the phase, or (with ``trains = True``) whose per-step hooks the standard loop calls."""

    trains: ClassVar[bool] = False
    """The phase is a training loop: its table takes every ``train`` key, the engine runs the loop and
    calls the object's per-step hooks (it needs no ``run``)."""

    requires_outputs: ClassVar[tuple[str, ...]] = ()
    """Head outputs the phase reads; the head must declare them in ``outputs``."""

    @optional
    def run(self, ctx: Any) -> dict[str, Any] | None:
        """Run the phase (required unless ``trains``) with a :class:`kdtoolkit.engine.phases.PhaseContext`;
        the returned JSON values are recorded in the stage history and ``metrics.jsonl``."""
        ...


#: The protocol of each component kind that has one.
PROTOCOLS: dict[str, type] = {
    "backbone": BackboneProtocol,
    "head": HeadProtocol,
    "loss": LossProtocol,
    "metric": MetricProtocol,
    "dataset": DatasetProtocol,
    "phase": PhaseProtocol,
}

_REQUIRED = inspect.Parameter.empty
#: The special methods a protocol may require.
_DUNDERS = ("__call__", "__len__", "__getitem__")


@dataclass(frozen=True)
class ProtocolMember:
    """One member of a protocol, as documented.

    :ivar name: the attribute or method name.
    :ivar kind: ``"class attribute"``, ``"instance attribute"`` or ``"method"``.
    :ivar type: the annotation as written (without ``ClassVar``), or the method's signature.
    :ivar required: whether a component must define it.
    :ivar default: what the core assumes when an optional attribute is absent (``None`` for the rest).
    :ivar doc: the member's documentation.
    :ivar owner: the protocol that declares it (a base protocol for shared members).
    """

    name: str
    kind: str
    type: str
    required: bool
    default: Any
    doc: str
    owner: str


def _attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a class's annotated attributes (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            out[node.target.id] = inspect.cleandoc(following.value.value)
    return out


def _own_protocols(protocol: type) -> list[type]:
    """``protocol`` and the protocols of this module it extends, its own first."""
    return [c for c in protocol.__mro__ if c.__module__ == __name__ and c is not Protocol and Protocol in c.__bases__]


def _signature_text(fn: Callable[..., Any]) -> str:
    """``(name: type, ...) -> type`` of a method without ``self``, its annotations as written."""
    sig = inspect.signature(fn)
    params = [
        f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name
        for p in list(sig.parameters.values())[1:]
    ]
    ret = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"({', '.join(params)}){ret}"


def protocol_members(protocol: type) -> list[ProtocolMember]:
    """The documented members of ``protocol``: its own first, then those of its base protocols."""
    out: list[ProtocolMember] = []
    seen: set[str] = set()
    for cls in _own_protocols(protocol):
        docs = _attribute_docs(cls)
        for name, ann in cls.__dict__.get("__annotations__", {}).items():
            if name in seen:
                continue
            seen.add(name)
            text = str(ann)
            is_class = text.startswith("ClassVar[")
            default = cls.__dict__.get(name, _REQUIRED)
            out.append(
                ProtocolMember(
                    name=name,
                    kind="class attribute" if is_class else "instance attribute",
                    type=text[len("ClassVar[") : -1] if is_class else text,
                    required=default is _REQUIRED,
                    default=None if default is _REQUIRED else default,
                    doc=docs.get(name, ""),
                    owner=cls.__name__,
                )
            )
        for name, fn in cls.__dict__.items():
            if name in seen or not inspect.isfunction(fn) or (name.startswith("_") and name not in _DUNDERS):
                continue
            seen.add(name)
            text = _signature_text(fn)
            out.append(
                ProtocolMember(
                    name=name,
                    kind="method",
                    type=text,
                    required=not getattr(fn, "__kdt_optional__", False),
                    default=None,
                    doc=inspect.cleandoc(fn.__doc__ or ""),
                    owner=cls.__name__,
                )
            )
    return out


def _hints(protocol: type) -> dict[str, Any]:
    """The evaluated attribute annotations of ``protocol`` (``ClassVar`` removed)."""
    hints = typing.get_type_hints(protocol)
    return {k: typing.get_args(v)[0] if typing.get_origin(v) is ClassVar else v for k, v in hints.items()}


def _matches(value: Any, ann: Any) -> bool:
    """Whether ``value`` has the annotated type (the shapes the protocols use; unknown ones pass)."""
    if ann is Any:
        return True
    if ann is type(None) or ann is None:
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann in (int, float):
        return isinstance(value, ann) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if origin in (Sequence, list):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is Callable:
        return callable(value)
    return True


def protocol_problems(obj: Any, kind: str) -> list[str]:
    """What ``obj`` lacks, or declares with the wrong type, of the protocol of ``kind``
    (:data:`PROTOCOLS`); empty when it satisfies it.

    ``obj`` is a factory (a class or a function, as registered: its class attributes are checked,
    and a class's required methods) or a built component (every member is checked). Optional members
    are checked only when present. A phase kind that trains needs no ``run``.
    """
    protocol = PROTOCOLS[kind]
    factory = inspect.isclass(obj) or inspect.isfunction(obj)
    hints = _hints(protocol)
    out: list[str] = []
    for m in protocol_members(protocol):
        if m.kind == "method":
            if factory and not inspect.isclass(obj):
                continue  # a function factory: its product's methods are checked once built
            required = m.required or (kind == "phase" and m.name == "run" and not getattr(obj, "trains", False))
            if m.name.startswith("__"):  # a special method: looked up on the class, never object's or type's
                cls = obj if inspect.isclass(obj) else type(obj)
                present = any(callable(vars(c).get(m.name)) for c in cls.__mro__ if c is not object)
            else:
                present = callable(getattr(obj, m.name, None))
            if required and not present:
                out.append(f"method '{m.name}'")
            continue
        if factory and m.kind == "instance attribute":
            continue
        if not hasattr(obj, m.name):
            if m.required:
                out.append(f"{m.kind} '{m.name}'")
            continue
        if not _matches(getattr(obj, m.name), hints[m.name]):
            out.append(f"{m.kind} '{m.name}' of type {m.type} (got {getattr(obj, m.name)!r})")
    return out
