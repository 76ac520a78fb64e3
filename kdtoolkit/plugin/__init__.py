"""The plugin system: the contract between the core and every plugin.

Owns the hook specifications (:mod:`.hookspecs`), the plugin manager and discovery (:mod:`.manager`), the
component registries and :class:`Component` (:mod:`.registry`), recipe parameters read from factory
signatures (:mod:`.params`), the on-disk schema cache that keeps validation torch-free
(:mod:`.schema_cache`), building a component from its recipe table by one rule for the keys its
factory receives (:mod:`.instantiation`), what components declare for the core to read (:mod:`.declared`:
a loss's taps, a head's record keys), the objects components receive (:mod:`.contracts`: ``Model``,
``Step``, parameter selectors), the typed contract of each component kind (:mod:`.protocols`) and
the core's own plugin ``kdt.core`` (:mod:`.builtin`).

May import: :mod:`kdtoolkit.foundation`.

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

_EXPORTS = {
    "NAME_KEYS": "instantiation",
    "name_key": "instantiation",
    "factory_kwargs": "instantiation",
    "build_component": "instantiation",
    "instantiate": "instantiation",
    "TAP_ATTRS": "declared",
    "declared_taps": "declared",
    "declares_taps": "declared",
    "record_keys": "declared",
    "Model": "contracts",
    "Step": "contracts",
    "selector_matches": "contracts",
    "selectors_overlap": "contracts",
    "select_parameters": "contracts",
    "PROJECT": "hookspecs",
    "hookspec": "hookspecs",
    "hookimpl": "hookspecs",
    "ENTRY_POINT_GROUP": "manager",
    "AUTOLOAD_ENV": "manager",
    "BLOCK_ENV": "manager",
    "CORE_PLUGIN": "manager",
    "PluginInfo": "manager",
    "own_distribution_only": "manager",
    "stdout_to_stderr": "manager",
    "PluginManager": "manager",
    "get_manager": "manager",
    "current_manager": "manager",
    "set_manager": "manager",
    "REQUIRED": "params",
    "ParamSpec": "params",
    "signature_params": "params",
    "type_name": "params",
    "is_path_annotation": "params",
    "MAX_SEED": "params",
    "MAX_BATCH_SIZE": "params",
    "MAX_NUM_WORKERS": "params",
    "MAX_EPOCHS": "params",
    "MAX_INPUT_BATCH_BYTES": "params",
    "describe_value": "params",
    "ParamTypeError": "params",
    "coerce": "params",
    "Rule": "params",
    "Range": "params",
    "NonEmpty": "params",
    "RULES": "params",
    "ParamChecks": "params",
    "TapsFrom": "params",
    "RESERVED_ARGS": "registry",
    "KINDS": "registry",
    "RESERVED_KEYS": "registry",
    "LIST_LIMIT": "registry",
    "summarize": "registry",
    "PLURALS": "registry",
    "HOOKS": "registry",
    "REFERENCE": "registry",
    "Component": "registry",
    "describe_exception": "registry",
    "describe_raise": "registry",
    "suggest": "registry",
    "Registry": "registry",
    "TapNames": "protocols",
    "ComponentProtocol": "protocols",
    "StepHooks": "protocols",
    "BackboneProtocol": "protocols",
    "HeadProtocol": "protocols",
    "LossProtocol": "protocols",
    "MetricProtocol": "protocols",
    "DatasetProtocol": "protocols",
    "PhaseProtocol": "protocols",
    "PROTOCOLS": "protocols",
    "ProtocolMember": "protocols",
    "protocol_members": "protocols",
    "protocol_problems": "protocols",
    "SCHEMA_ATTRS": "schema_cache",
    "CACHE_FILE": "schema_cache",
    "cache_path": "schema_cache",
    "SchemaCache": "schema_cache",
    "schema_cache": "schema_cache",
    "import_reference": "schema_cache",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
