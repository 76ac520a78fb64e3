"""Building a component from its recipe table: the one rule for what a factory receives.

Every component the core builds (backbones, heads, losses, metrics, datasets, plugin phases,
optimisers and schedules; in training, the preflight's dry build, evaluation, ``kdt predict``,
``kdt evaluate``, ``kdt export``, ``kdt check`` and the testing kit) is built here, by
:func:`instantiate` or :func:`build_component`, with one rule:

* the component is the one its table names: ``spec["name"]`` (``spec["dataset"]`` for a
  dataset, ``spec["kind"]`` for a phase: :data:`NAME_KEYS`);
* the factory receives, as keywords, **the keys of the table that are its recipe parameters**
  (its annotated keyword parameters, :attr:`Component.params
  <kdtoolkit.plugin.registry.Component.params>`), with their values as they are. Every other key
  is the core's own and is never passed: the name, the keys of :data:`~kdtoolkit.plugin.registry.RESERVED_KEYS`
  (``id`` and ``weight`` of a loss, a data table's ``batch_size``, ...) and the training keys of a
  phase that trains. A recipe table is validated first (an unknown key is a recipe error there),
  so for a resolved table this is the table less the core's keys;
* the arguments the core passes itself (:data:`~kdtoolkit.plugin.registry.RESERVED_ARGS`: a head's
  ``in_channels`` and ``num_classes``, a dataset's ``split`` and ``augment``, an optimiser's
  parameter groups, a schedule's optimiser and epochs) come first, positionally, in that order;
  runtime keywords that are not recipe keys (a backbone's ``num_classes`` where its signature has
  it) are passed as ``extra`` keywords.

A factory that raises becomes one :class:`~kdtoolkit.foundation.errors.PluginError` line naming
the plugin and the component (:meth:`Component.build <kdtoolkit.plugin.registry.Component.build>`);
an unknown name is the registry's :class:`~kdtoolkit.foundation.errors.RecipeError` with a
suggestion and the registered names.

Torch-free: importing this module imports no torch (building a component imports its module).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kdtoolkit.plugin.registry import Component

if TYPE_CHECKING:
    from kdtoolkit.plugin.manager import PluginManager

#: The key of a component's table that names it, where it is not ``name``: a data table names its
#: dataset in ``dataset``, and a phase names its kind in ``kind`` (its ``name`` is the phase's own).
NAME_KEYS: dict[str, str] = {"dataset": "dataset", "phase": "kind"}


def name_key(kind: str) -> str:
    """The key of a ``kind`` component's recipe table that names the component (:data:`NAME_KEYS`)."""
    return NAME_KEYS.get(kind, "name")


def factory_kwargs(comp: Component, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords ``comp``'s factory receives from the recipe table ``spec``: the keys of ``spec``
    that are its recipe parameters, in the table's order, with their values unchanged.

    :raises PluginError: when the factory (registered by reference) cannot be imported or its
        signature cannot be read.
    """
    comp.factory  # noqa: B018 -- the parameters of the factory that will be called, not of a kept schema
    params = comp.params
    return {k: v for k, v in spec.items() if k in params}


def build_component(comp: Component, spec: Mapping[str, Any], /, *args: Any, **extra: Any) -> Any:
    """Build the registered component ``comp`` from its recipe table ``spec``.

    Calls the factory as ``factory(*args, **factory_kwargs(comp, spec), **extra)``.

    :param args: the arguments the core passes itself, positionally (a head's ``in_channels`` and
        ``num_classes``, a dataset's ``split`` and ``augment``, ...).
    :param extra: runtime keywords that are not recipe keys (a backbone's ``num_classes``).
    :raises TypeError: when a key of ``extra`` is also a recipe parameter in ``spec``.
    :raises PluginError: when the factory raises (see :meth:`Component.build
        <kdtoolkit.plugin.registry.Component.build>`).
    """
    kwargs = factory_kwargs(comp, spec)
    both = sorted(set(kwargs) & set(extra))
    if both:
        raise TypeError(f"{comp.kind} '{comp.name}': '{both[0]}' is given both in the recipe table and by the core")
    return comp.build(*args, **kwargs, **extra)


def instantiate(
    kind: str,
    spec: Mapping[str, Any] | str,
    /,
    *args: Any,
    plugins: PluginManager | None = None,
    **extra: Any,
) -> Any:
    """Build the ``kind`` component that the recipe table ``spec`` names, by the module's one rule.

    :param kind: the component kind (``backbone``, ``head``, ``loss``, ``metric``, ``dataset``,
        ``phase``, ``optimizer``, ``scheduler``).
    :param spec: the component's resolved recipe table, e.g. ``{"name": "kd", "id": "kd", "weight":
        1.0, "temperature": 4.0}``; or only the component's name (its defaults are used).
    :param args: the arguments the core passes itself, positionally (see :func:`build_component`).
    :param plugins: the plugin manager whose registries to use (default: the current one).
    :param extra: runtime keywords that are not recipe keys.
    :returns: what the factory built.
    :raises RecipeError: for an unknown component name (with a suggestion and the registered names).
    :raises PluginError: when the factory raises, naming the plugin and the component.
    """
    if plugins is None:
        from kdtoolkit.plugin.manager import get_manager

        plugins = get_manager()
    if isinstance(spec, str):
        spec = {name_key(kind): spec}
    comp = plugins.registry(kind).get(spec[name_key(kind)])
    return build_component(comp, spec, *args, **extra)
