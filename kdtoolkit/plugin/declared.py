"""What a component declares for the core to read, each read in one place.

* :func:`declared_taps`: the taps a loss reads (``requires_taps`` / ``requires_teacher_taps``:
  a tuple of tap names, one name, or a function of the loss's parameters returning them). Recipe
  validation reads them from the registered class, to check the stage declares them; training
  reads them from the built loss, to hook only the taps its active losses read.
* :func:`record_keys`: the outputs a head keeps per test image in evaluation records (its
  ``record_keys``). Recipe validation checks the metrics' ``requires_records`` against them;
  evaluation, ``kdt evaluate``, ``kdt export`` and the run-directory API record them.

Torch-free, so that checking a recipe imports no torch: a registered component's declarations come
from its kept schema where there is one (:meth:`Component.attr <kdtoolkit.plugin.registry.Component.attr>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdtoolkit.plugin.registry import Component

#: The attributes in which a loss declares the taps it reads: the student's and the teacher's.
TAP_ATTRS = ("requires_taps", "requires_teacher_taps")


def _declared(obj: Any, attr: str) -> Any:
    """``attr`` of a registered component (its factory's, or its kept schema's) or of a class or an object."""
    if isinstance(obj, Component):
        return obj.attr(attr, ())
    return getattr(obj, attr, ())


def declared_taps(obj: Any, attr: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The tap names a loss declares in ``attr`` (``requires_taps`` or ``requires_teacher_taps``),
    given its parameters.

    :param obj: the registered loss (a :class:`~kdtoolkit.plugin.registry.Component`), its class, or
        the built loss (whose attribute may be set per instance).
    :param attr: one of :data:`TAP_ATTRS`.
    :param params: the loss's recipe parameters, passed to a declaration that is a function.
    :returns: the tap names, in the order declared (``()`` for none).
    """
    value = _declared(obj, attr)
    if callable(value):
        value = value(params)
    if isinstance(value, str):
        value = (value,)
    return tuple(value or ())


def declares_taps(obj: Any) -> bool:
    """Whether a loss declares any taps, student's or teacher's, whatever its parameters (a declaration
    that is a function counts).

    :param obj: as for :func:`declared_taps`.
    """
    return any(bool(_declared(obj, attr)) for attr in TAP_ATTRS)


def record_keys(head: Any) -> tuple[str, ...]:
    """The outputs ``head`` keeps per test image in evaluation records, besides ``logits`` and
    ``labels`` (its ``record_keys``; ``()`` when it declares none).

    :param head: the registered head (a :class:`~kdtoolkit.plugin.registry.Component`), its class,
        or the built head.
    """
    return tuple(_declared(head, "record_keys") or ())
