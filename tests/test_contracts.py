"""Typed component contracts: protocols, annotated hook specs and checks declared on the component.

- every built-in component satisfies the protocol of its kind (``kdtoolkit.plugin.protocols``), as
  registered and, for a few tiny ones, once built;
- every hook spec is fully annotated, with types that resolve;
- a loss written as one module, its checks and taps declared on its class (``ParamChecks``,
  ``Range``, ``NonEmpty``, ``TapsFrom``), is validated with one-line errors naming the file and the
  key, and once its schema is kept, validating a recipe that uses it imports neither its module nor
  torch.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import typing

import pytest

from kdtoolkit.foundation.errors import PluginError, RecipeError
from kdtoolkit.plugin import hookimpl, hookspecs
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.params import NonEmpty, ParamChecks, Range, TapsFrom
from kdtoolkit.plugin.protocols import PROTOCOLS, protocol_members, protocol_problems
from kdtoolkit.plugin.registry import Registry
from kdtoolkit.plugin.schema_cache import SCHEMA_ATTRS
from kdt_testutil import TINY_DATA

# --------------------------------------------------------------------------- protocols


def test_every_builtin_component_satisfies_the_protocol_of_its_kind():
    pm = PluginManager()
    checked = 0
    for kind in PROTOCOLS:
        for comp in pm.registry(kind):
            assert protocol_problems(comp.factory, kind) == [], f"{kind} '{comp.name}' (plugin '{comp.owner}')"
            checked += 1
    assert checked >= 30  # every kind has built-in components: guards against a vacuous pass


def test_tiny_built_components_satisfy_their_protocols():
    from kdtoolkit.testing import TinyDataset

    pm = PluginManager()

    def build(kind: str, name: str, *args, **params):
        return pm.registry(kind).get(name).build(*args, **params)

    built = {
        "dataset": [TinyDataset("train", n=4), build("dataset", "digits", "test", False, image_size=16)],
        "head": [build("head", "linear", 8, 3), build("head", "identity", 3, 3)],
        "loss": [build("loss", n) for n in ("cross_entropy", "hinton_kd", "dkd")]
        + [build("loss", "fitnet", student_tap="a", teacher_tap="b")],
        "metric": [build("metric", "accuracy"), build("metric", "agreement")],
    }
    for kind, objs in built.items():
        for obj in objs:
            assert protocol_problems(obj, kind) == [], f"{kind} {type(obj).__name__}"


def test_protocol_problems_name_what_is_missing_or_mistyped():
    class Loss:
        requires_outputs = ["logits"]  # a list: validation and the schema cache expect a tuple
        requires_teacher = "yes"

    assert protocol_problems(Loss, "loss") == [
        "class attribute 'requires_teacher' of type bool (got 'yes')",
        "class attribute 'requires_outputs' of type tuple[str, ...] (got ['logits'])",
        "method '__call__'",
    ]

    class Dataset:
        def __len__(self) -> int:
            return 0

        def __getitem__(self, i: int) -> tuple:
            return (None, 0)

    assert protocol_problems(Dataset, "dataset") == []  # instance attributes are checked once built
    assert protocol_problems(Dataset(), "dataset") == [
        "instance attribute 'classes'",
        "instance attribute 'num_classes'",
        "instance attribute 'name'",
    ]

    class Trains:
        trains = True

    assert protocol_problems(Trains, "phase") == [] and protocol_problems(object, "phase") == ["method 'run'"]


def test_the_protocols_declare_every_attribute_read_from_registered_classes_and_document_every_member():
    declared = {m.name for p in PROTOCOLS.values() for m in protocol_members(p) if m.kind == "class attribute"}
    assert set(SCHEMA_ATTRS) <= declared, f"not in any protocol: {sorted(set(SCHEMA_ATTRS) - declared)}"
    for protocol in PROTOCOLS.values():
        for m in protocol_members(protocol):
            assert m.doc, f"{protocol.__name__}.{m.name} is undocumented"


def test_protocols_are_exported_and_rendered_by_the_docs_generator():
    import kdtoolkit.plugin as plugin
    from kdtoolkit.cli import docgen

    assert "kdtoolkit.plugin.protocols" in docgen.CORE_MODULES
    for protocol in PROTOCOLS.values():
        assert getattr(plugin, protocol.__name__) is protocol
    table = "\n".join(docgen.protocol_table(PROTOCOLS["loss"]))
    assert (
        "| `requires_teacher` | class attribute, optional, read from the registered class | `bool` | `False` |" in table
    )
    assert "| `check_models(model: Model, teacher: Model \\| None) -> None` | method, optional |" in table
    assert "`check_params` (`ComponentProtocol`)" in table


# --------------------------------------------------------------------------- hook specs


def _hook_specs() -> list:
    return [
        fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("kdt_") and fn.__module__ == hookspecs.__name__
    ]


def test_every_hook_spec_is_fully_annotated_with_types_that_resolve():
    import click

    from kdtoolkit.foundation.tables import Table
    from kdtoolkit.plugin.registry import Registry as RegistryType

    specs = _hook_specs()
    assert len(specs) == 13
    names = {"Registry": RegistryType, "Table": Table, "click": click}
    for fn in specs:
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            assert p.annotation is not p.empty, f"{fn.__name__}: parameter '{p.name}' is not annotated"
        assert sig.return_annotation is not sig.empty, f"{fn.__name__}: the return type is not annotated"
        hints = typing.get_type_hints(fn, localns=names)  # the annotations name real types
        assert set(hints) == set(sig.parameters) | {"return"}
        assert inspect.getdoc(fn), f"{fn.__name__} lost its docstring"
    assert typing.get_type_hints(hookspecs.kdt_register_losses, localns=names)["registry"] is RegistryType


def test_hook_specs_and_protocols_import_no_torch():
    code = (
        "import sys, kdtoolkit.plugin.hookspecs, kdtoolkit.plugin.protocols\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'click'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]


# --------------------------------------------------------------------------- declared checks


def test_rules_give_the_messages_of_the_check_functions_they_replace():
    checks = ParamChecks(
        Range("t", gt=0), Range("w", ge=0), Range("s", ge=0, lt=1), Range("m", ge=0, le=1), NonEmpty("tap", "no tap")
    )
    good = {"t": 4.0, "w": 0.0, "s": 0.0, "m": 1.0, "tap": "a"}
    checks(dict(good))
    for key, value, message in [
        ("t", 0.0, "must be > 0, got 0.0"),
        ("w", -1.0, "must be >= 0, got -1.0"),
        ("s", 1.0, "must be in [0, 1), got 1.0"),
        ("m", 1.5, "must be in [0, 1], got 1.5"),
        ("tap", "", "no tap"),
    ]:
        with pytest.raises(ValueError) as info:
            checks({**good, key: value})
        assert info.value.args == (key, message)
    Range("t", gt=0).check({"t": None})  # an unset optional parameter passes
    assert Range("n", ge=1).describe() == ">= 1" and Range("x", lt=2).describe() == "< 2"
    with pytest.raises(TypeError):
        Range("x")
    with pytest.raises(TypeError):
        Range("x", gt=0, ge=1)
    assert TapsFrom("a", "b")({"a": "x", "b": ["y", "z"]}) == ("x", "y", "z") and TapsFrom("a")({"a": None}) == ()


def test_rules_naming_an_unknown_or_unfit_parameter_fail_the_plugin():
    class Typo:
        """A loss."""

        check_params = ParamChecks(Range("temprature", gt=0))

        def __init__(self, *, temperature: float = 1.0): ...

    class NotANumber:
        """A loss."""

        check_params = ParamChecks(Range("mode", gt=0))

        def __init__(self, *, mode: str = "a"): ...

    reg = Registry("loss").bound("rules")
    with pytest.raises(PluginError, match="loss 'typo': check_params: Range names 'temprature', which is not a param"):
        reg.add("typo", Typo)
    with pytest.raises(PluginError, match="Range needs a number parameter, 'mode' is a string"):
        reg.add("mode", NotANumber)


def test_the_classic_bundle_declares_its_checks_and_taps_as_data():
    pm = PluginManager()
    for kind, name in [("loss", n) for n in pm.registry("loss").names()] + [("head", "linear")]:
        comp = pm.registry(kind).get(name)
        if comp.owner == "classic" and comp.name != "identity":
            assert type(comp.factory.check_params) is ParamChecks, name
    fitnet = pm.registry("loss").get("fitnet").factory
    assert fitnet.requires_taps == TapsFrom("student_tap") and fitnet.requires_teacher_taps == TapsFrom("teacher_tap")


# --------------------------------------------------------------------------- a loss as one module

HOOKS = """
from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_losses(registry):
    registry.add("feature_mse", "kdt_onefile.losses:FeatureMSE")
"""

LOSS = '''
import torch
import torch.nn.functional as F

from kdtoolkit.plugin import NonEmpty, ParamChecks, Range, TapsFrom


class FeatureMSE:
    """Mean squared error between a student tap and a teacher tap.

    :param student_tap: the student tap.
    :param teacher_tap: the teacher tap.
    :param scale: factor applied to the error, > 0.
    """

    requires_teacher = True
    requires_outputs = ()
    requires_teacher_outputs = ()
    requires_taps = TapsFrom("student_tap")
    requires_teacher_taps = TapsFrom("teacher_tap")
    check_params = ParamChecks(NonEmpty("student_tap"), NonEmpty("teacher_tap"), Range("scale", gt=0))

    def __init__(self, *, student_tap: str, teacher_tap: str, scale: float = 1.0):
        self.student_tap, self.teacher_tap, self.scale = student_tap, teacher_tap, scale

    def __call__(self, step):
        return self.scale * F.mse_loss(step.features[self.student_tap], step.teacher_features[self.teacher_tap])
'''

RECIPE = (
    TINY_DATA
    + """
[stages.teacher]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]

[stages.kd]
teacher = "teacher"
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
model.taps = { f = "backbone.body.layer1" }
teacher_taps = { g = "backbone.body.layer1" }
losses = [{ name = "cross_entropy" }, { name = "feature_mse", student_tap = "f", teacher_tap = "g", scale = 2.0 }]
[[stages.kd.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
"""
)

#: Run in a fresh interpreter: validate the recipe (and a bad override) with the plugin module
#: registered, then say which heavy modules were imported.
PROBE = """
import json, sys
import kdt_onefile
from kdtoolkit.foundation.errors import RecipeError
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.recipe import load_recipe

pm = PluginManager(extra=[(kdt_onefile, "onefile")])
load_recipe(sys.argv[1], plugins=pm)
try:
    load_recipe(sys.argv[1], ["stages.kd.losses[1].scale=0"], plugins=pm)
    error = None
except RecipeError as exc:
    error = str(exc)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "kdt_onefile"))
print(json.dumps({"error": error, "loaded": loaded}))
"""


def test_a_loss_written_as_one_module_is_validated_from_its_declarations_without_torch(
    kdt_plugin, tmp_path, monkeypatch
):
    import time

    from kdtoolkit.plugin import registry
    from kdtoolkit.recipe import load_recipe

    site = tmp_path / "site"
    (site / "kdt_onefile").mkdir(parents=True)
    (site / "kdt_onefile" / "__init__.py").write_text(textwrap.dedent(HOOKS))
    (site / "kdt_onefile" / "losses.py").write_text(textwrap.dedent(LOSS))
    recipe = tmp_path / "onefile.toml"
    recipe.write_text(RECIPE)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_STARTED_NS", time.time_ns() + 1)  # the files above count as older
    for name in ("kdt_onefile", "kdt_onefile.losses"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import kdt_onefile

    kdt_plugin(kdt_onefile, "onefile")
    assert "kdt_onefile.losses" not in sys.modules
    load_recipe(recipe)  # imports the loss module and keeps the schemas of every component
    assert "kdt_onefile.losses" in sys.modules
    for override, key, message in [
        ("scale=0", "scale", "must be > 0, got 0.0"),
        ('student_tap=""', "student_tap", "must not be empty"),
        ("scale=-1.5", "scale", "must be > 0, got -1.5"),
    ]:
        with pytest.raises(RecipeError) as info:
            load_recipe(recipe, [f"stages.kd.losses[1].{override}"])
        assert str(info.value) == f"{recipe}: stages.kd.losses[1].{key}: {message}"
    with pytest.raises(RecipeError, match="reads the tap 'h', which the stage's teacher_taps does not declare"):
        load_recipe(recipe, ['stages.kd.losses[1].teacher_tap="h"'])

    # a fresh process validates from the kept schemas: the same error, no torch, no loss module
    kept = json.loads((tmp_path / "cache" / "component-schemas-v2.json").read_text())["components"]
    assert kept["kdt_onefile.losses:FeatureMSE"]["checks"][2] == {
        "rule": "Range",
        "fields": {"key": "scale", "gt": 0, "ge": None, "lt": None, "le": None},
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["error"] == f"{recipe}: stages.kd.losses[1].scale: must be > 0, got 0.0"
    assert got["loaded"] == ["kdt_onefile"], f"validation imported {got['loaded']}"


def test_a_kept_schema_rebuilds_declared_checks_and_taps(tmp_path, monkeypatch):
    import time

    from kdtoolkit.plugin import registry

    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path / "cache"))
    pm = PluginManager()
    monkeypatch.setattr(registry, "_STARTED_NS", time.time_ns() + 1)
    comp = pm.registry("loss").get("crd")
    factory = comp.factory  # keeps the schema
    monkeypatch.delitem(sys.modules, "kdt_classic.losses")
    reg = Registry("loss").bound("classic")
    reg.add("crd", comp.reference)
    fresh = reg.get("crd")
    assert fresh.check_params() == factory.check_params and "kdt_classic.losses" not in sys.modules
    assert fresh.attr("requires_taps") == TapsFrom("student_tap")
    with pytest.raises(ValueError) as info:
        fresh.check_params()(
            {**{p: s.default for p, s in fresh.params.items()}, "student_tap": "a", "teacher_tap": "b", "nce_m": 2.0}
        )
    assert info.value.args == ("nce_m", "must be in [0, 1], got 2.0")


def test_check_component_holds_a_component_to_its_protocol(kdt_plugin):
    """The testing kit's check_component fails, naming the protocol, on a metric whose declared
    requires_records has the wrong type; the same metric declared right passes."""
    import types

    from kdtoolkit.testing import check_component

    class Wrong:
        """A metric that declares requires_records as a string."""

        requires_records = "logits"

        def __call__(self, records, reference=None):
            return {"n": float(len(records["logits"]))}

    class Right(Wrong):
        """The same metric, requires_records a tuple."""

        requires_records = ("logits",)

    module = types.ModuleType("kdt_protocol_probe")

    @hookimpl
    def kdt_register_metrics(registry):
        registry.add("wrong_records", Wrong)
        registry.add("right_records", Right)

    module.kdt_register_metrics = kdt_register_metrics  # type: ignore[attr-defined]
    kdt_plugin(module, "protocol_probe")
    with pytest.raises(
        AssertionError, match=r"metric 'wrong_records'.*does not satisfy MetricProtocol: .*requires_records"
    ):
        check_component("metric", "wrong_records")
    check_component("metric", "right_records")
