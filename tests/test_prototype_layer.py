"""The shared prototype layer (``kdt_prototypes``) and a core that names no prototype metric.

- the prototype architectures (``kdt_protopnet``, ``kdt_prototree``) and the method
  (``kdt_proto2proto``) import ``kdt_prototypes``, never each other, and ``kdt_prototypes`` imports
  none of them; nothing in ``plugins/`` imports a moved name from its old place;
- no module of ``kdtoolkit/`` names AAP or AJS outside docstrings and comments;
- ``report.md`` draws any metric's result keyed by a threshold against it, with the title, symbol
  and axis label its metric component declares (``threshold_tables``).
"""

from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path

import pytest

from kdtoolkit.plugin.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
PROTOTYPE_PACKAGES = ("kdt_protopnet", "kdt_prototree", "kdt_proto2proto")

#: Modules that moved to ``kdt_prototypes``; their old names only re-export.
MOVED_MODULES = {
    "kdt_protopnet.explain",
    "kdt_protopnet.figures",
    "kdt_protopnet.receptive_field",
    "kdt_protopnet.sheet",
    "kdt_proto2proto.protocol",
}
#: Names that moved out of the architectures' ``functional`` modules (still importable from there).
MOVED_FUNCTIONAL = {
    "kdt_protopnet.functional": {
        "squared_l2_distances",
        "min_pool_distances",
        "distance_to_similarity",
        "ProjectionResult",
        "PrototypeProjector",
    },
    "kdt_prototree.functional": {"l2_distances", "LN2", "ProjectionResult", "PrototypeProjector", "min_pool"},
}


def _modules(package: str) -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted((PLUGINS / package).rglob("*.py")):
        parts = path.relative_to(PLUGINS).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))))
    return out


def _imports(module: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """Every import of ``tree`` (at any depth, lazy ones too) as ``(absolute module, imported names)``.

    The plugin packages are one level deep: a relative import is relative to the top-level package.
    """
    package = module.split(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1, f"{module}: import from beyond its package"
                target = f"{package}.{node.module}" if node.module else package
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            out.append((target, names))
            out += [(f"{target}.{n}", []) for n in names]  # "from pkg import module"
    return out


def _all_plugin_modules() -> list[tuple[str, ast.Module]]:
    return [m for pkg in sorted(p.name for p in PLUGINS.iterdir() if p.name.startswith("kdt_")) for m in _modules(pkg)]


def test_prototype_architectures_and_methods_never_import_each_other():
    wrong = []
    for package in PROTOTYPE_PACKAGES + ("kdt_prototypes",):
        forbidden = set(PROTOTYPE_PACKAGES) - {package}
        for module, tree in _modules(package):
            for target, _ in _imports(module, tree):
                if target.split(".")[0] in forbidden:
                    wrong.append(f"{module} imports {target}")
    assert not wrong, wrong
    uses = {
        pkg: any(t.split(".")[0] == "kdt_prototypes" for m, tree in _modules(pkg) for t, _ in _imports(m, tree))
        for pkg in PROTOTYPE_PACKAGES
    }
    assert all(uses.values()), uses  # each stands on the shared layer


def test_no_plugin_module_uses_a_moved_name_at_its_old_place():
    wrong = []
    for module, tree in _all_plugin_modules():
        if module in MOVED_MODULES or module in MOVED_FUNCTIONAL:
            continue  # the re-exports themselves
        aliases = {}
        for target, names in _imports(module, tree):
            if target in MOVED_MODULES:
                wrong.append(f"{module} imports {target}")
            moved = MOVED_FUNCTIONAL.get(target, set())
            wrong += [f"{module} imports {n} from {target}" for n in names if n in moved]
        for node in ast.walk(tree):  # "from . import functional as F" then F.<moved name>
            if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
                for alias in node.names:
                    full = f"{module.split('.')[0]}.{alias.name}"
                    if full in MOVED_FUNCTIONAL:
                        aliases[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr in MOVED_FUNCTIONAL[aliases[node.value.id]]:
                    wrong.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, wrong


def test_old_import_paths_serve_the_moved_objects():
    import kdt_proto2proto.protocol
    import kdt_protopnet.explain
    import kdt_protopnet.figures
    import kdt_protopnet.functional
    import kdt_protopnet.receptive_field
    import kdt_protopnet.sheet
    import kdt_prototree.functional

    import kdt_prototypes
    from kdt_prototypes import explain, figures, functional, protocol, receptive_field, sheet

    assert kdt_protopnet.explain.greedy_path is explain.greedy_path
    assert kdt_protopnet.figures.prototype_figure is figures.prototype_figure
    assert kdt_protopnet.receptive_field.RFInfo is receptive_field.RFInfo
    assert kdt_protopnet.sheet.Sheet is sheet.Sheet
    assert kdt_proto2proto.protocol.prototype_head is protocol.prototype_head
    for old in (kdt_protopnet.functional, kdt_prototree.functional):
        assert old.PrototypeProjector is functional.PrototypeProjector
    assert kdt_protopnet.functional.squared_l2_distances is functional.squared_l2_distances
    assert kdt_prototree.functional.l2_distances is functional.l2_distances
    assert kdt_prototree.functional.min_pool is functional.min_pool_distances
    assert kdt_prototree.functional.LN2 == functional.LN2
    assert issubclass(kdt_prototree.functional.ProtoTreeProjector, functional.PrototypeProjector)
    for name in kdt_prototypes.__all__:  # every export resolves
        assert getattr(kdt_prototypes, name) is not None
    with pytest.raises(AttributeError):
        kdt_prototypes.no_such_name


def test_greedy_path_leaf_matches_the_tree_functions():
    """The explanation's greedy path (in the shared layer, which knows no tree layout function)
    ends at the leaf of ProtoTree's own greedy prediction, pruned or not."""
    import torch

    from kdt_prototree import functional as T
    from kdt_prototree.head import ProtoTreeHead
    from kdt_prototypes.explain import greedy_path

    torch.manual_seed(0)
    head = ProtoTreeHead(in_channels=4, num_classes=3, depth=3, prototype_depth=4)
    min_d = torch.rand(16, head.num_prototypes) * 1.4  # around ln 2: both directions taken
    for forced_node in (None, 1):
        if forced_node is not None:
            head.forced[forced_node] = 1  # a pruned node: everything goes right there
        _, leaf, _ = T.greedy_prediction(min_d, head.leaves, head.depth, head.forced)
        assert [greedy_path(head, min_d[b])["leaf"] for b in range(16)] == leaf.tolist()
    assert len(set(leaf.tolist())) > 1


# --------------------------------------------------------------------------- the core names no prototype metric


def _string_constants(tree: ast.Module) -> list[ast.Constant]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_the_core_names_no_prototype_metric_outside_docstrings_and_comments():
    word = re.compile(r"(?<![a-z])(aap|ajs)(?![a-z])", re.IGNORECASE)
    found = []
    for path in sorted((ROOT / "kdtoolkit").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [
            f"{path.relative_to(ROOT)}:{c.lineno}: {c.value!r}" for c in _string_constants(tree) if word.search(c.value)
        ]
    assert not found, found


def test_proto2proto_metrics_declare_their_threshold_figures():
    from kdtoolkit.plugin.manager import get_manager

    metrics = get_manager().registry("metric")
    tau = {"symbol": "τ", "label": "threshold τ"}
    assert metrics.get("aap").attr("threshold_tables") == {
        "aap": {"title": "AAP (average number of active patches)", **tau}
    }
    assert metrics.get("ajs").attr("threshold_tables") == {"ajs": {"title": "AJS (against the teacher)", **tau}}
    assert metrics.get("accuracy").attr("threshold_tables") is None


def test_report_figure_names_are_reserved():
    from kdtoolkit.foundation.paths import name_problem

    assert "reserved" in name_problem("report-overlap.png") and "reserved" in name_problem("Report-AJS.png")
    assert name_problem("report") is None and name_problem("overlap") is None


# --------------------------------------------------------------------------- a third-party metric against its threshold


class Overlap:
    """A fake metric keyed by a cut-off: the fraction of logits at or below each cut-off.

    :param cuts: the cut-offs (``inf`` allowed).
    """

    requires_reference = False
    requires_records = ("logits",)
    threshold_tables = {
        "overlap": {"title": "Overlap (a test metric)", "symbol": "k", "label": "cut-off k"},
        "../escape": {"title": "never drawn"},  # not a file name: left out
    }

    def __init__(self, *, cuts: list[float] = [0.5, 2.0, float("inf")]):
        self.cuts = list(cuts)

    def __call__(self, records, reference=None) -> dict:
        logits = records["logits"].float()
        table = {("inf" if c == float("inf") else f"{c:g}"): float((logits <= c).double().mean()) for c in self.cuts}
        return {"overlap": table, "overlap_note": "fake"}


def _overlap_plugin() -> types.ModuleType:
    import torch
    from torch import nn

    class Pixel(nn.Module):
        """One strided 3×3 convolution: a backbone for tests."""

        reduction = 2

        def __init__(self):
            super().__init__()
            self.out_channels = 8
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    mod = types.ModuleType("kdt_test_overlap")

    @hookimpl
    def kdt_register_metrics(registry):
        registry.add("overlap", Overlap)

    @hookimpl
    def kdt_register_backbones(registry):
        registry.add("pixel8", Pixel)

    mod.kdt_register_metrics = kdt_register_metrics
    mod.kdt_register_backbones = kdt_register_backbones
    return mod


RECIPE = """
name = "overlap"
[data]
dataset = "tiny"
batch_size = 8
[evaluate]
metrics = [{ name = "accuracy" }, { name = "overlap", cuts = [0.5, 2.0, inf] }]
[stages.s]
model.backbone = { name = "pixel8" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 0.01 }]
"""


def test_a_plugin_metric_keyed_by_a_threshold_is_drawn_against_it(kdt_plugin, tmp_path, monkeypatch):
    from kdtoolkit.cli.commands import main
    from kdtoolkit.results import plots
    from kdtoolkit.results.aggregate import Stat, deltas_table

    kdt_plugin(_overlap_plugin(), "overlap_test")
    drawn = []
    real = plots.threshold_figure

    def spy(series, title, path, label="threshold"):
        drawn.append((sorted(series), [t for t, _ in series["s"]], title, Path(path).name, label))
        return real(series, title, path, label)

    monkeypatch.setattr(plots, "threshold_figure", spy)
    recipe = tmp_path / "overlap.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "runs"
    assert main(["run", str(recipe), "--seeds", "0,1", "--out", str(out), "-q", "--device", "cpu"]) == 0
    assert drawn == [
        (
            ["s"],
            [0.5, 2.0, float("inf")],
            "Overlap (a test metric) against k, mean ± sd over 2 runs",
            "report-overlap.png",
            "cut-off k",
        )
    ]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## OVERLAP against k\n" in md
    assert "; k = ∞ (no threshold) at its own tick on the right." in md
    assert "![OVERLAP against k](report-overlap.png)" in md
    assert "against τ" not in md and "escape" not in md
    assert (out / "report-overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*escape*"))
    # the differences table names the declared symbol at ∞ (and a plain "(∞)" without a declaration)
    stat = Stat([0.1, 0.2], 2, signed=True)
    table = deltas_table({"s": ("b", {("overlap", "inf"): stat, ("other", "inf"): stat})}, {"overlap": "k"})
    assert table.columns[2:] == ["overlap (k=∞)", "other (∞)"]
    result = json.loads((out / "seed-0" / "results.json").read_text(encoding="utf-8"))["stages"]["s"]
    assert sorted(result["overlap"]) == ["0.5", "2", "inf"]
