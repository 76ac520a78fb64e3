"""The component schema cache: validation reads kept schemas instead of importing factories.

A kept schema must give exactly what the factory gives (parameters, the
attributes validation reads, the same ``check_params``), be used only while
its source files and versions are unchanged, and never be kept when JSON
cannot hold it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from kdtoolkit.plugin import schema_cache as schemas
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import Registry


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _started_now(monkeypatch):
    """As if the process started now: files written by the test count as older."""
    import time

    from kdtoolkit.plugin import registry

    monkeypatch.setattr(registry, "_STARTED_NS", time.time_ns() + 1)


def _fresh(comp):
    """A component for the same reference, as a new process would see it (factory not imported)."""
    reg = Registry(comp.kind).bound(comp.owner)
    reg.add(comp.name, comp.reference)
    return reg.get(comp.name)


def test_every_builtin_schema_round_trips(cache_dir, monkeypatch):
    pm = PluginManager()
    kept = 0
    for kind in pm.registries:
        for comp in pm.registry(kind):
            if not comp.reference:
                continue
            factory = comp.factory  # imports the module and keeps the schema
            got = schemas.schema_cache().get(comp.reference)
            if got is None:  # not JSON-representable (e.g. a callable attribute): never kept
                with pytest.raises(schemas._NotKept):
                    [schemas._value(getattr(factory, a)) for a in schemas.SCHEMA_ATTRS if hasattr(factory, a)]
                continue
            kept += 1
            assert got["params"] == comp.params, comp.reference
            for p in comp.params.values():
                assert got["params"][p.name].annotation == p.annotation and got["params"][p.name].default == p.default
            for a in schemas.SCHEMA_ATTRS:
                assert got["attrs"].get(a, "absent") == getattr(factory, a, "absent"), (comp.reference, a)
                assert type(got["attrs"].get(a)) is type(getattr(factory, a, None)), (comp.reference, a)
            check = getattr(factory, "check_params", None)
            assert (got["check"] is None) == (check is None)
            if check is not None:
                assert schemas.import_reference(got["check"]) is check
    assert kept >= 30
    # a component read in a new process uses the schema: same params, attributes and check
    monkeypatch.delitem(sys.modules, "kdt_protopnet.head")
    comp = _fresh(PluginManager().registry("head").get("protopnet"))
    assert comp.params["prototypes_per_class"].default == 10
    assert "kdt_protopnet.head" not in sys.modules
    assert comp.attr("record_keys") == ("min_distances", "argmin") and comp.attr("requires_teacher", 5) == 5
    assert comp.check_params().__module__ == "kdt_protopnet.checks"
    assert "kdt_protopnet.head" not in sys.modules and not comp.loaded
    assert comp.attr("record_meta") is not None and comp.loaded  # an attribute validation does not read: imported


def _write_module(folder, body: str, name: str = "kdt_schema_probe"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


PROBE = """
    from pathlib import Path
    from typing import Literal

    def check(params):
        if params["k"] < 0:
            raise ValueError("k", "must be >= 0")

    class Probe:
        requires_teacher = False
        requires_outputs = ("logits",)
        check_params = staticmethod(check)

        def __init__(self, *, k: int = 2, mode: Literal["a", "b"] = "a", scale: float = float("inf"),
                     names: list[str] = ["x"], path: Path | None = None, table: dict[str, float] = {}):
            pass
"""


def test_a_kept_schema_is_used_until_its_module_changes(cache_dir, tmp_path, monkeypatch):
    folder = tmp_path / "site"
    _write_module(folder, PROBE)
    monkeypatch.syspath_prepend(str(folder))
    _started_now(monkeypatch)
    reg = Registry("loss").bound("probe")
    reg.add("probe", "kdt_schema_probe:Probe")
    comp = reg.get("probe")
    params = comp.params  # imports the module and keeps the schema
    assert (
        json.loads((cache_dir / schemas.CACHE_FILE).read_text())["components"]["kdt_schema_probe:Probe"]["check"]
        == "kdt_schema_probe:check"
    )
    monkeypatch.delitem(sys.modules, "kdt_schema_probe")
    again = Registry("loss").bound("probe")
    again.add("probe", "kdt_schema_probe:Probe")
    fresh = again.get("probe")
    assert fresh.params == params and fresh.params["scale"].default == float("inf")
    assert fresh.attr("requires_outputs") == ("logits",) and "kdt_schema_probe" not in sys.modules
    with pytest.raises(ValueError):
        fresh.check_params()({"k": -1})  # imports only the module of the check
    # the module changes (another parameter): the kept schema is stale, the module is read again
    monkeypatch.delitem(sys.modules, "kdt_schema_probe")
    _write_module(folder, PROBE.replace("k: int = 2", "k: int = 3, extra: bool = False"))
    stamp = os.stat(folder / "kdt_schema_probe.py")
    os.utime(folder / "kdt_schema_probe.py", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    third = Registry("loss").bound("probe")
    third.add("probe", "kdt_schema_probe:Probe")
    changed = third.get("probe")
    assert changed.params["k"].default == 3 and "extra" in changed.params


def test_an_unkeepable_schema_is_not_kept_and_another_environment_is_ignored(cache_dir, tmp_path, monkeypatch):
    folder = tmp_path / "site"
    _write_module(
        folder, PROBE + "\n    Probe.requires_outputs = staticmethod(lambda params: ())\n", "kdt_schema_probe2"
    )
    monkeypatch.syspath_prepend(str(folder))
    _started_now(monkeypatch)
    reg = Registry("loss").bound("probe")
    reg.add("probe", "kdt_schema_probe2:Probe")
    reg.get("probe").params
    assert schemas.schema_cache().get("kdt_schema_probe2:Probe") is None  # a callable attribute: not kept
    # a cache written under other versions is ignored as a whole
    comp = PluginManager().registry("head").get("protopnet")
    comp.params
    path = cache_dir / schemas.CACHE_FILE
    data = json.loads(path.read_text())
    assert "kdt_protopnet.head:ProtoPNetHead" in data["components"]
    data["environment"]["torch"] = "0.0.1"
    path.write_text(json.dumps(data))
    assert schemas.SchemaCache(path).get("kdt_protopnet.head:ProtoPNetHead") is None
    path.write_text("{not json")
    assert schemas.SchemaCache(path).get("kdt_protopnet.head:ProtoPNetHead") is None


def test_an_imported_module_is_read_itself_not_its_kept_schema(cache_dir, monkeypatch):
    from kdt_protopnet.head import ProtoPNetHead

    PluginManager().registry("head").get("protopnet").params  # keeps the schema

    def refuse(params):
        raise ValueError("prototypes_per_class", "patched in this process")

    monkeypatch.setattr(ProtoPNetHead, "check_params", staticmethod(refuse))
    comp = PluginManager().registry("head").get("protopnet")
    assert comp.check_params() is refuse


def test_a_schema_is_not_kept_from_a_newer_file_nor_used_from_another_location(cache_dir, tmp_path, monkeypatch):
    first, second = tmp_path / "one", tmp_path / "two"
    _write_module(first, PROBE, "kdt_schema_probe3")
    _write_module(second, PROBE.replace("k: int = 2", "k: int = 7"), "kdt_schema_probe3")
    # written after this process started using components: not kept
    monkeypatch.syspath_prepend(str(first))
    reg = Registry("loss").bound("probe")
    reg.add("probe", "kdt_schema_probe3:Probe")
    reg.get("probe").params
    assert schemas.schema_cache().get("kdt_schema_probe3:Probe") is None
    monkeypatch.delitem(sys.modules, "kdt_schema_probe3")
    _started_now(monkeypatch)
    reg = Registry("loss").bound("probe")
    reg.add("probe", "kdt_schema_probe3:Probe")
    assert reg.get("probe").params["k"].default == 2
    assert schemas.schema_cache().get("kdt_schema_probe3:Probe") is not None
    # another checkout of the same module (found first on the path): its own file, not the kept schema
    monkeypatch.delitem(sys.modules, "kdt_schema_probe3")
    monkeypatch.syspath_prepend(str(second))
    assert schemas.schema_cache().get("kdt_schema_probe3:Probe") is None
    reg = Registry("loss").bound("probe")
    reg.add("probe", "kdt_schema_probe3:Probe")
    assert reg.get("probe").params["k"].default == 7
