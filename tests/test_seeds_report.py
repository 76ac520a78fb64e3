"""``kdt run --seeds`` (and the recipe's ``seeds``) and ``kdt report``: one tiny Proto2Proto recipe, two seeds."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from kdt_testutil import TINY_DATA

from kdtoolkit.cli.commands import main

STAGE = """
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 1 }}
model.head = {{ name = "protopnet", prototypes_per_class = 1, prototype_depth = 8 }}
[stages.{name}.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 0.8 }}
{extra}
[[stages.{name}.phases]]
name = "joint"
epochs = 1
limit_batches = 1
groups = [{{ params = "backbone", lr = 1e-3 }}, {{ params = "head", lr = 3e-3 }}]
[[stages.{name}.phases]]
name = "push"
kind = "push"
figure = false
"""
KD_LOSSES = "global_explanation = { weight = 1.0 }\npatch_prototype_correspondence = { weight = 1.0, tau = 4.0 }"
RECIPE = (
    TINY_DATA
    + """
[evaluate]
metrics = [{ name = "accuracy" }, { name = "aap", taus = [0.1, 1.0, inf] }, { name = "ajs", taus = [0.1, 1.0, inf] }]
[stages.teacher]
"""
    + STAGE.format(name="teacher", extra="")
    + '\n[stages.baseline]\ncompare_to = "teacher"\nseed = 3\n'
    + STAGE.format(name="baseline", extra="")
    + '\n[stages.kd]\nteacher = "teacher"\n'
    + STAGE.format(name="kd", extra=KD_LOSSES)
)


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "--seeds", "0,1", "--out", str(root / "run"), "-q"]) == 0
    return recipe, root / "run"


def test_each_seed_is_a_complete_run_with_its_own_seeds(seeds_run):
    from safetensors.torch import load_file

    from kdtoolkit.engine.data import derive_seed
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.engine.multiseed import stage_seed

    recipe, run = seeds_run
    original = load_recipe(recipe).resolved
    for n in (0, 1):
        d = run / f"seed-{n}"
        assert (d / "results.json").is_file() and (d / "results.md").is_file()
        assert _json(d / "run.json")["seed"] == n
        resolved = _json(d / "recipe.resolved.json")
        assert resolved["seed"] == n and not resolved.get("seeds")
        for name, st in resolved["stages"].items():
            s = original["stages"][name]["seed"]
            assert st["seed"] == stage_seed(s, n) == derive_seed(s, n, 3)
    seeds0, seeds1 = (
        {k: v["seed"] for k, v in _json(run / f"seed-{n}" / "recipe.resolved.json")["stages"].items()} for n in (0, 1)
    )
    assert all(seeds0[k] != seeds1[k] for k in seeds0)
    assert seeds0["teacher"] == seeds0["kd"] != seeds0["baseline"]  # the recipe's sharing is kept
    w0, w1 = (load_file(str(run / f"seed-{n}" / "teacher" / "model.safetensors")) for n in (0, 1))
    assert any(not (w0[k] == w1[k]).all() for k in w0)
    assert (run / "report.md").is_file()
    assert set(_json(run / "seeds.json")["runs"]) == {"seed-0", "seed-1"}


def test_rerun_and_recipe_key_reuse_every_stage(seeds_run, capsys):
    recipe, run = seeds_run
    files = sorted(run.glob("seed-*/*/model.safetensors")) + sorted(run.glob("seed-*/*/metrics.jsonl"))
    before = {f: f.stat().st_mtime_ns for f in files}
    assert main(["run", str(recipe), "--seeds", "0,1", "--out", str(run), "-q"]) == 0
    assert main(["run", str(recipe), "--set", "seeds=[1, 0]", "--out", str(run), "-q"]) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == before
    out = capsys.readouterr().out
    assert "Table 1" in out and f"report: {run / 'report.md'}" in out


def _values(run, stage, *path):
    out = []
    for n in (0, 1):
        v = _json(run / f"seed-{n}" / "results.json")["stages"][stage]
        for k in path:
            v = v[k]
        out.append(v)
    return out


def test_report_means_and_sds_equal_a_recomputation(seeds_run, capsys):
    _, run = seeds_run
    capsys.readouterr()
    assert main(["report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and report["seeds"] == [0, 1]
    for stage in ("teacher", "baseline", "kd"):
        for path in (("accuracy",), ("aap", "inf"), ("aap", "0.1"), ("ajs", "1")):
            values = _values(run, stage, *path)
            got = report["metrics"][stage]
            for k in path:
                got = got[k]
            assert got["values"] == values
            assert got["mean"] == statistics.mean(values) and got["sd"] == statistics.stdev(values)
    diffs = [k - b for k, b in zip(_values(run, "kd", "ajs", "inf"), _values(run, "baseline", "ajs", "inf"))]
    delta = report["deltas"]["kd"]
    assert delta["baseline"] == "baseline"
    assert delta["metrics"]["ajs"]["inf"]["mean"] == statistics.mean(diffs)
    assert delta["metrics"]["ajs"]["inf"]["sd"] == statistics.stdev(diffs)
    from scipy.stats import t as student_t  # paired t-test by hand: t = mean / (sd / sqrt(n)), two-sided, n - 1 dof

    assert statistics.stdev(diffs) > 0  # two seeds give two different differences
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / len(diffs) ** 0.5)
    assert delta["metrics"]["ajs"]["inf"]["p"] == pytest.approx(2 * student_t.sf(abs(t), len(diffs) - 1), rel=1e-9)
    md = (run / "report.md").read_text(encoding="utf-8")
    ajs, acc = _values(run, "kd", "ajs", "inf"), _values(run, "kd", "accuracy")
    assert f"| {statistics.mean(ajs):.4f} ± {statistics.stdev(ajs):.4f} |" in md  # Table 1 and Table 2
    assert f"| {100 * statistics.mean(acc):.2f}% ± {100 * statistics.stdev(acc):.2f}% |" in md
    assert f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f}" in md
    assert "Table 2: loss combinations" in md and "Differences from the baseline" in md and "n − 1" in md


def test_report_figures_are_pngs(seeds_run):
    from PIL import Image

    _, run = seeds_run
    md = (run / "report.md").read_text(encoding="utf-8")
    for name in ("report-aap.png", "report-ajs.png", "report-training.png"):
        assert f"]({name})" in md
        with Image.open(run / name) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 300
    assert "](seed-0/training.png)" in md


def test_report_of_run_directories_and_refused_mixtures(seeds_run, tmp_path, capsys):
    _, run = seeds_run
    out = tmp_path / "r" / "two.md"
    assert main(["report", str(run / "seed-0"), str(run / "seed-1"), "--out", str(out)]) == 0
    assert (tmp_path / "r" / "two-ajs.png").is_file() and "(seed 1)" in out.read_text(encoding="utf-8")
    other = tmp_path / "other"
    shutil.copytree(run / "seed-1", other)
    resolved = _json(other / "recipe.resolved.json")
    resolved["stages"]["kd"]["losses"][0]["weight"] = 0.5
    (other / "recipe.resolved.json").write_text(json.dumps(resolved))
    capsys.readouterr()
    assert main(["report", str(run / "seed-0"), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "seed-0") in err and str(other) in err
    assert "stages.kd.losses" in err and "different recipes" in err
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
        (["--seeds", "1,1"], "--seeds: seed 1 is listed twice"),
        (["--set", "seeds=[0, -1]"], "seeds[1]: must be >= 0"),
        (["--set", "seeds=[2, 2]"], "seeds[1]: seed 2 is listed twice"),
        (["--set", "seeds=3"], "seeds: expected a list"),
    ],
)
def test_bad_seeds_are_one_line_errors(tmp_path, capsys, args, fragment):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_seeds_key_validates_and_resolves(tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("seeds = [4, 2]\n" + RECIPE)
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 0
    assert "seeds = [4, 2]" in capsys.readouterr().out


def test_table_cells_keep_numbers():
    from kdtoolkit.results.aggregate import aggregate_cell
    from kdtoolkit.foundation.tables import Number, fmt

    assert fmt(Number(0.97771, ".2%")) == "97.77%"
    cell = aggregate_cell(["14.00%", Number(0.16, ".2%"), None], 3)
    assert cell.values == [0.14, 0.16] and cell.text() == "15.00% ± 1.41% (n=2)"
    assert aggregate_cell(["pushed", "pushed"], 2) == "pushed"
    assert aggregate_cell(["pushed", "no push"], 2) == "pushed / no push"


def test_ctrl_c_after_a_seeds_last_stage_stops_before_the_next(tmp_path, monkeypatch):
    """A Ctrl-C that no boundary of seed 0's run saw still stops the command before seed 1 (exit 130)."""
    import kdtoolkit.engine.runner as runner
    from kdtoolkit.foundation.distributed import Dist
    from kdtoolkit.foundation.errors import Interrupted
    from kdtoolkit.plugin.manager import get_manager
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.engine.multiseed import run_seeds

    calls = []

    def fake_run(recipe, options, plugins, progress, dist=None, stop=None):
        calls.append(options.out.name)
        stop.requested = True  # as the SIGINT handler does
        return {"name": "tiny", "stages": {}}

    monkeypatch.setattr(runner, "run_recipe", fake_run)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    options = runner.RunOptions(out=tmp_path / "run", device="cpu", quiet=True)
    with pytest.raises(Interrupted, match="before seed 1"):
        run_seeds(load_recipe(recipe), [0, 1], options, get_manager(), Dist())
    assert calls == ["seed-0"]
