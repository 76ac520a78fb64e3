"""kdtoolkit 0.2's module paths still import for one version, with a deprecation warning."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from kdtoolkit._compat import MOVED

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, sys, warnings
from kdtoolkit._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    out[old] = {
        "same": module is importlib.import_module(new),
        "spec": module.__spec__.name,
        "warned": [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)],
    }
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from kdtoolkit.engine import RunDir
    from kdtoolkit.use import RunDir as new
out["engine.RunDir"] = {"same": RunDir is new, "warned": [str(w.message) for w in caught]}
print(json.dumps(out))
"""


def test_every_old_module_path_is_the_new_module_with_a_warning():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert len(MOVED) >= 30
    for old, new in MOVED.items():
        got = found[old]
        assert got["same"], f"{old} is not {new}"
        assert got["spec"] == new, f"{old}: the shared module's spec was renamed to {got['spec']}"
        assert got["warned"] == [f"{old} moved to {new}; the old name goes in the next version"], old
    assert found["engine.RunDir"]["same"]
    assert any("kdtoolkit.engine.RunDir moved to kdtoolkit.use.RunDir" in w for w in found["engine.RunDir"]["warned"])


def test_a_plugin_written_for_0_2_runs_unchanged(tmp_path):
    """A third-party plugin that imports the old paths registers and trains, warning only."""
    pkg = tmp_path / "oldstyle_plugin.py"
    pkg.write_text(
        "import torch\n"
        "from kdtoolkit.hookspecs import hookimpl\n"
        "from kdtoolkit.components import Step\n"
        "from kdtoolkit.errors import RecipeError\n\n"
        "class Half(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n\n"
        "    def forward(self, step: Step):\n"
        "        return 0.5 * torch.nn.functional.cross_entropy(step.outputs['logits'], step.targets)\n\n"
        "@hookimpl\n"
        "def kdt_register_losses(registry):\n"
        "    registry.add('half_ce', Half)\n"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'seed = 0\n[data]\ndataset = "digits"\nimage_size = 16\nbatch_size = 32\n'
        '[stages.s]\nmodel = { backbone = { name = "timm", model = "resnet10t", out_index = 1 }, '
        'head = { name = "linear" } }\n'
        'losses = [{ name = "half_ce" }]\nmetrics = [{ name = "accuracy" }]\n'
        '[[stages.s.phases]]\nkind = "train"\nepochs = 1\nlimit_batches = 2\n'
        'optimizer = { name = "sgd" }\ngroups = [{ params = ["backbone", "head"], lr = 0.01 }]\n'
    )
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "import oldstyle_plugin\n"
        "from kdtoolkit.plugins import PluginManager, set_manager\n"
        "from kdtoolkit.cli import main\n"
        "set_manager(PluginManager(extra=[(oldstyle_plugin, 'oldstyle')]))\n"
        f"sys.exit(main(['run', {str(recipe)!r}, '--out', {str(tmp_path / 'run')!r}, '-q']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kdtoolkit.hookspecs moved to kdtoolkit.plugin.hookspecs" in done.stderr
    result = json.loads((tmp_path / "run" / "s" / "result.json").read_text())
    assert 0 <= result["accuracy"] <= 1 and result["losses"] == {"half_ce": 1.0}


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_nothing_shipped_imports_an_old_path():
    found = []
    for top in (ROOT / "kdtoolkit", ROOT / "plugins"):
        for path in sorted(top.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in MOVED]
    assert not found, "old module paths used:\n" + "\n".join(found)
