"""A testing kit for plugin authors, shipped as a pytest plugin (entry point ``pytest11``).

Installed with kdtoolkit; in a plugin package's tests::

    def test_my_loss(kdt_plugin, tmp_path):
        import my_plugin.plugin

        kdt_plugin(my_plugin.plugin, "mine")           # registered, installed or not
        results = run_recipe(RECIPE_TEXT, out=tmp_path)  # in-process kdt run
        check_component("loss", "my_loss")               # the component's contract

What it provides:

- the fixture ``kdt_plugin(module, name)``: registers a plugin module for
  the test, whether or not its package is also installed (an installed
  entry point of the same module is left out of this test's plugin manager,
  so pluggy never sees the module twice), together with the kit's own
  plugin (the dataset ``tiny``); the process's manager is restored after the
  test;
- :func:`run_recipe`: runs a recipe (text or path) in-process, without
  progress bars, and returns its results (``results.json``);
- the dataset ``tiny`` (:class:`TinyDataset`): a few seeded random images
  in memory, for recipes that must run in seconds;
- :func:`check_component`: checks a registered component's contract.

See ``docs/plugins.md``, "Testing your plugin".

The top layer of kdtoolkit: may import every other package (it runs recipes through the engine and
documents parameters as :mod:`kdtoolkit.cli.docgen` does); nothing in kdtoolkit imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest

from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.declared import declares_taps
from kdtoolkit.plugin.protocols import PROTOCOLS, protocol_problems
from kdtoolkit.plugin.instantiation import build_component, instantiate
from kdtoolkit.plugin.manager import ENTRY_POINT_GROUP, PluginManager, get_manager, set_manager

#: Plugin name under which the kit registers its own components (the dataset ``tiny``).
KIT_PLUGIN = "kdt.testing"


class TinyDataset:
    """``n`` seeded random RGB images of ``size`` pixels in ``num_classes`` classes, in memory.

    Class ``c``'s images are brighter in channel ``c % 3``, so a model can
    learn them in a few steps. Train and test splits are disjoint seeds.

    :param n: images in the split.
    :param size: side in pixels.
    :param num_classes: number of classes.
    :param seed: seed of the split's images (the test split adds 1).
    """

    def __init__(
        self, split: str, augment: bool = False, *, n: int = 32, size: int = 16, num_classes: int = 3, seed: int = 0
    ):
        import torch

        g = torch.Generator().manual_seed(seed + (1 if split == "test" else 0))
        self.labels = torch.arange(n) % num_classes
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.5
        for i, c in enumerate(self.labels.tolist()):
            self.images[i, c % 3] += 0.5
        self.classes = [f"class{c}" for c in range(num_classes)]
        self.num_classes = num_classes
        self.name = "tiny"
        self.targets = self.labels.tolist()

    @staticmethod
    def check_params(params: dict) -> None:
        for key in ("n", "size", "num_classes"):
            if params[key] < 1:
                raise ValueError(key, f"must be >= 1, got {params[key]}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


@hookimpl
def kdt_register_datasets(registry):
    registry.add("tiny", "kdtoolkit.testing:TinyDataset")


class _KitPlugin:
    """The kit's registrations, as a plugin object (the module itself is the pytest plugin)."""

    kdt_register_datasets = staticmethod(kdt_register_datasets)


def _entry_points_of(module_name: str) -> list[str]:
    from importlib import metadata

    return [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value.split(":")[0] == module_name]


def make_manager(*plugins: tuple[Any, str]) -> PluginManager:
    """A plugin manager with the installed plugins, the kit's plugin and ``plugins`` (``(module, name)``).

    An installed entry point that points at one of the given modules is left
    out, so that the module is registered once, under the given name.
    """
    blocked = [ep for module, _ in plugins for ep in _entry_points_of(getattr(module, "__name__", ""))]
    before = os.environ.get("KDT_BLOCK_PLUGINS")
    if blocked:
        os.environ["KDT_BLOCK_PLUGINS"] = ",".join(filter(None, [before, *blocked]))
    try:
        return PluginManager(extra=[(_KitPlugin, KIT_PLUGIN), *plugins])
    finally:
        if blocked:
            if before is None:
                os.environ.pop("KDT_BLOCK_PLUGINS", None)
            else:
                os.environ["KDT_BLOCK_PLUGINS"] = before


@pytest.fixture
def kdt_plugin() -> Iterator:
    """``register(module, name) -> PluginManager``: make ``module`` a plugin for this test.

    The returned manager (also the process's, so that :func:`run_recipe` and
    the ``kdt`` command functions see it) holds the installed plugins, the
    kit's plugin and every module registered so far in the test (a module
    registered again keeps only its latest name).
    """
    from kdtoolkit.plugin.manager import current_manager

    previous = current_manager()  # None when no manager was made yet: restored as it was
    registered: list[tuple[Any, str]] = []

    def register(module: Any, name: str) -> PluginManager:
        registered[:] = [(m, n) for m, n in registered if m is not module]  # a module again: its new name
        registered.append((module, name))
        pm = make_manager(*registered)
        set_manager(pm)
        return pm

    yield register
    set_manager(previous)


def run_recipe(
    text_or_path: str | os.PathLike,
    overrides: tuple[str, ...] | list[str] = (),
    out: str | os.PathLike | None = None,
    device: str | None = "cpu",
) -> dict[str, Any]:
    """Run a recipe in-process and return its results (the content of ``results.json``).

    :param text_or_path: TOML text, or the path of a recipe file.
    :param overrides: ``KEY=VALUE`` overrides, as ``kdt run --set``.
    :param out: the run directory (default: a new temporary folder). Recipe text is
        written beside it, as ``<out>.recipe.toml``.
    :param device: as ``kdt run --device`` (default ``cpu``, so tests are repeatable).
    :raises kdtoolkit.foundation.errors.KdtError: for bad input, as the command would report it.
    """
    from kdtoolkit.foundation.distributed import Dist
    from kdtoolkit.engine.runner import RunOptions, run_recipe as _run
    from kdtoolkit.foundation.progress import Progress
    from kdtoolkit.recipe.loader import load_recipe

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="kdt-run-"))
    path = Path(text_or_path) if not isinstance(text_or_path, str) or "\n" not in text_or_path else None
    if path is None:
        out.mkdir(parents=True, exist_ok=True)
        path = out.parent / f"{out.name}.recipe.toml"
        from kdtoolkit.foundation.io import atomic_write_text

        assert isinstance(text_or_path, str)  # path is None only for recipe text
        atomic_write_text(path, text_or_path)
    plugins = get_manager()
    rec = load_recipe(path, tuple(overrides), plugins=plugins)
    opts = RunOptions(out=out, device=device, quiet=True, command="kdtoolkit.testing.run_recipe")
    with Progress(enabled=False) as progress:
        return _run(rec, opts, plugins, progress, Dist())


def check_component(
    kind: str, name: str, params: dict[str, Any] | None = None, plugins: PluginManager | None = None
) -> Any:
    """Check the contract of the registered ``kind`` component ``name``; returns it built.

    - its parameters are annotated (the registry reads them) and each is
      documented in the factory's docstring (``:param x:`` or an ``Args:``
      section), and its docstring has a summary;
    - it satisfies its kind's protocol (:mod:`kdtoolkit.plugin.protocols`: the class attributes
      the core reads, with their types, and the required methods; :func:`protocol_problems`);
    - what the core reads is declared: a head's ``outputs`` (with
      ``logits``) and ``param_groups``; a loss's ``requires_outputs``; a
      metric's ``requires_records``;
    - it builds with ``params`` (required parameters must be given);
    - a loss is called on a fake step (a tiny model's outputs on random
      images, the same model as teacher) and returns a finite scalar; a
      metric is called on fake records and returns a dict. Losses that read
      outputs, taps or memories the tiny model does not provide are only
      built.

    :raises AssertionError: naming the component and what is wrong.
    """
    from kdtoolkit.cli.docgen import param_docs

    plugins = plugins or get_manager()
    comp = plugins.registry(kind).get(name)
    label = f"{kind} '{name}' (plugin '{comp.owner}')"
    assert comp.summary, f"{label}: the factory has no docstring summary"
    documented = param_docs(comp.factory)
    missing = [p for p in comp.params if p not in documented]
    assert not missing, f"{label}: parameters not documented in the docstring: {', '.join(missing)}"
    params = dict(params or {})
    unknown = [p for p in params if p not in comp.params]
    assert not unknown, f"{label}: not parameters of the factory: {', '.join(unknown)}"
    required = [p for p, spec in comp.params.items() if spec.required and p not in params]
    assert not required, f"{label}: give values for its required parameters: {', '.join(required)}"
    if kind in PROTOCOLS:
        problems = protocol_problems(comp.factory, kind)
        assert not problems, f"{label}: does not satisfy {PROTOCOLS[kind].__name__}: {'; '.join(problems)}"
    check = {"head": _check_head, "loss": _check_loss, "metric": _check_metric}.get(kind)
    if check is None:
        return None
    return check(comp, params, label, plugins)


def _tiny_model(plugins: PluginManager, num_classes: int = 3):
    import torch
    from torch import nn

    from kdtoolkit.plugin.contracts import Model

    class Backbone(nn.Module):
        out_channels, reduction = 8, 2

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    head = instantiate("head", "linear", 8, num_classes, plugins=plugins)
    return Model(Backbone(), head)


def _check_head(comp, params, label, plugins):
    outputs = comp.attr("outputs")
    assert isinstance(outputs, tuple) and "logits" in outputs, f"{label}: class attribute 'outputs' must list 'logits'"
    assert isinstance(comp.attr("param_groups"), tuple), f"{label}: class attribute 'param_groups' must be a tuple"
    import torch

    head = build_component(comp, params, 8, 3)
    out = head(torch.rand(2, 8, 4, 4))
    missing = [k for k in outputs if k not in out]
    assert not missing, f"{label}: outputs declared but not returned: {', '.join(missing)}"
    return head


def _check_loss(comp, params, label, plugins):
    import math

    import torch

    from kdtoolkit.plugin.contracts import Step

    needs = tuple(comp.attr("requires_outputs", ()) or ()) + tuple(comp.attr("requires_teacher_outputs", ()) or ())
    assert isinstance(comp.attr("requires_outputs", ()), tuple), f"{label}: 'requires_outputs' must be a tuple"
    loss = build_component(comp, params)
    if (
        set(needs) - {"logits", "features"}
        or declares_taps(comp)
        or comp.attr("requires_indices")
        or hasattr(loss, "setup")
    ):
        return loss  # reads what the tiny model does not provide: built only
    model, teacher = _tiny_model(plugins), _tiny_model(plugins)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        t_out = teacher(x) if comp.attr("requires_teacher") else None
    step = Step(
        x, y, model(x), model, t_out, teacher if comp.attr("requires_teacher") else None, indices=torch.arange(4)
    )
    value = loss(step)
    assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{label}: must return a scalar tensor"
    assert math.isfinite(float(value.detach())), f"{label}: returned {float(value.detach())} on a fake step"
    return loss


def _check_metric(comp, params, label, plugins):
    import torch

    from kdtoolkit.results.records import Records

    needs = comp.attr("requires_records", ())
    assert isinstance(needs, tuple), f"{label}: class attribute 'requires_records' must be a tuple"
    metric = build_component(comp, params)
    if set(needs) - {"logits", "labels"}:
        return metric
    g = torch.Generator().manual_seed(0)
    recs = Records({"logits": torch.randn(12, 3, generator=g), "labels": torch.arange(12) % 3}, {"H": 1, "W": 1})
    ref = Records({"logits": torch.randn(12, 3, generator=g), "labels": torch.arange(12) % 3}, {"H": 1, "W": 1})
    out = metric(recs, ref if comp.attr("requires_reference") else None)
    assert isinstance(out, dict), f"{label}: must return a dict of results"
    return metric
