"""The ProtoTree bundle inside real runs, and tree distillation (kdt_proto2proto).

A tiny tree recipe (16 px digits, ResNet-10t cut at stride 8: a 2x2 grid,
trees of depth 2-3) runs in process once; the tests read its run
directory. The resume test runs ``kdt`` in subprocesses (one thread) with the
gate plugin of ``kdt_faultutil``: Ctrl-C in the middle of an epoch, then the
same command again, must give the weights, loss state and records of an
uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from kdt_faultutil import assert_same_weights, make_gate_plugin, one_line_error, plugin_env, run
from kdt_proto2proto import functional as P
from kdt_proto2proto.losses import GlobalExplanationLoss, TreeKDLoss
from kdt_protopnet.head import ProtoPNetHead
from kdt_prototree.head import ProtoTreeHead
from kdt_testutil import run_kdt
from kdtoolkit.plugin.contracts import Model
from kdtoolkit.engine.context import StageState

DATA = """
seed = 3
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 128
"""

TREE_GROUPS = (
    '[{ params = "head.prototypes", lr = 1e-3 }, { params = ["head.add_on", "backbone.body.layer2"], lr = 1e-3 }, '
    '{ params = "backbone", lr = 1e-3 }]'
)

RECIPE = (
    DATA
    + f"""
[evaluate]
metrics = [
    {{ name = "accuracy" }}, {{ name = "tree_modes" }}, {{ name = "aap" }}, {{ name = "ajs" }}, {{ name = "pms" }}
]

[stages.teacher]
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "prototree", depth = 3, prototype_depth = 8 }}
losses = ["prototree_nll"]
[[stages.teacher.phases]]
name = "joint"
epochs = 2
limit_batches = 4
accumulate = 2
optimizer = {{ name = "adamw", eps = 1e-7 }}
scheduler = {{ name = "multistep", milestones = [1], gamma = 0.5 }}
groups = {TREE_GROUPS}
[[stages.teacher.phases]]
name = "prune"
kind = "prune"
threshold = 0.2
[[stages.teacher.phases]]
name = "project"
kind = "project"

[stages.kd]
teacher = "teacher"
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "prototree", depth = 3, prototype_depth = 8 }}
model.init_from_teacher = ["head.leaves"]
[stages.kd.losses]
prototree_nll = {{ weight = 1.0 }}
global_explanation = {{ weight = 10.0 }}
patch_prototype_correspondence = {{ weight = 10.0, tau = 1.0 }}
tree_kd = {{ weight = 1.0 }}
[[stages.kd.phases]]
name = "kd_warm"
epochs = 1
limit_batches = 2
losses = ["global_explanation", "patch_prototype_correspondence"]
groups = [{{ params = "head.prototypes", lr = 1e-3 }}, {{ params = "head.add_on", lr = 1e-3 }}]
[[stages.kd.phases]]
name = "joint"
epochs = 1
limit_batches = 2
groups = {TREE_GROUPS}
[[stages.kd.phases]]
name = "prune"
kind = "prune"
[[stages.kd.phases]]
name = "project"
kind = "project"
figure = false
"""
)


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    """The tiny tree recipe run in process, with every leaf-update call recorded."""
    from kdtoolkit.cli.commands import main

    d = tmp_path_factory.mktemp("tree_run")
    recipe = d / "tree.toml"
    recipe.write_text(RECIPE)
    calls = []
    original = ProtoTreeHead.on_optimizer_step

    def counting(self, state):
        before = self.leaves.detach().clone()
        original(self, state)
        calls.append(
            {
                "stage": state.stage,
                "phase": state.phase,
                "epoch": state.epoch,
                "micro": len(state.steps),
                "optimizer_steps": state.optimizer_steps,
                "changed": not torch.equal(before, self.leaves),
            }
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProtoTreeHead, "on_optimizer_step", counting)
        assert main(["run", str(recipe), "--out", str(d / "run"), "-q"]) == 0
    return d, recipe, d / "run", json.loads((d / "run" / "results.json").read_text()), calls


def test_leaf_update_runs_once_per_optimizer_step_in_a_real_run(tree_run):
    *_, out, _, calls = tree_run
    teacher = [c for c in calls if c["stage"] == "teacher"]
    # 2 epochs x 4 batches, accumulate = 2: 2 optimiser steps per epoch, each over 2 micro-batches
    assert [(c["epoch"], c["micro"], c["optimizer_steps"]) for c in teacher] == [
        (1, 2, 2),
        (1, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
    ]
    assert all(c["changed"] for c in calls)
    # kd: 2 steps in kd_warm, 2 in joint (accumulate = 1)
    assert [(c["phase"], c["micro"]) for c in calls if c["stage"] == "kd"] == [("kd_warm", 1)] * 2 + [("joint", 1)] * 2
    leaves = load_file(str(out / "teacher" / "model.safetensors"))["head.leaves"]
    assert leaves.abs().sum() > 0  # they start at zero


def test_tiny_tree_recipe_end_to_end_with_pruning_projection_and_modes(tree_run):
    *_, out, results, _ = tree_run
    for name in ("teacher", "kd"):
        r = results["stages"][name]
        kinds = [h["kind"] for h in r["history"]]
        assert kinds[-2:] == ["prune", "project"]
        prune = next(h for h in r["history"] if h["kind"] == "prune")
        assert prune["leaves"] == 8 and 1 <= prune["leaves_kept"] <= 8
        assert r["state"]["pushed"] is True and r["state"]["pruned"]["leaves_kept"] == prune["leaves_kept"]
        tm = r["tree_modes"]
        assert tm["accuracy"]["soft"] == pytest.approx(r["accuracy"])
        for mode in ("sample_max", "greedy"):
            assert 0 <= tm["accuracy"][mode] <= 1 and 0 <= tm["fidelity"][mode] <= 1
            assert 0 < tm["mean_path_length"][mode] <= 3
        assert set(r["aap"]) == set(r["ajs"]) and r["pms"] is not None
        projected = json.loads((out / name / "project-project.json").read_text())["prototypes"]
        assert len(projected) == 7 and all(p["found"] for p in projected if p["node_kept"])
    assert results["stages"]["teacher"]["ajs"]["inf"] == 1.0
    md = (out / "results.md").read_text()
    assert "ProtoTree inference modes" in md and "Table 2" in md and "L_model" in md
    # the projected prototypes are training patches: the model's prototypes equal the recorded patches
    assert (out / "teacher" / "prototypes-project.png").exists()


def test_kdt_metrics_with_pms_on_a_tree_run(tree_run):
    from kdtoolkit.cli.commands import main

    d, _, out, results, _ = tree_run
    assert main(["metrics", str(out), "--pms", "--json", str(d / "m.json")]) == 0
    m = json.loads((d / "m.json").read_text())
    assert m["kd"]["pms"] == pytest.approx(results["stages"]["kd"]["pms"])
    assert Path(m["kd"]["pms_matching"]).exists()


def test_unsupported_pairings_are_refused_with_one_line(tree_run, tmp_path):
    d, _, out, _, _ = tree_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)  # the teacher is reused: only the refused stage is built
    recipe = tmp_path / "bad.toml"
    recipe.write_text(
        RECIPE
        + """
[stages.shallow]
base = "kd"
model.head.depth = 2
model.init_from_teacher = []
"""
    )
    proc = run_kdt("run", str(recipe), "--out", str(run_dir), "-q", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "stages.shallow.losses" in line and 'pairing = "index"' in line and "matched_per_epoch" in line


def _model(head) -> Model:
    return Model(torch.nn.Identity(), head)


def test_heads_that_cannot_be_distilled_are_refused():
    torch.manual_seed(0)
    tree = _model(ProtoTreeHead(6, 4, depth=2, prototype_depth=5))
    ppnet = _model(ProtoPNetHead(6, 4, prototypes_per_class=1, prototype_depth=5))
    with pytest.raises(ValueError, match="teacher's ProtoPNetHead has no 'log_probabilities'"):
        TreeKDLoss.check_models(tree, ppnet)
    linear = _model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lacks prototypes, latent, record_meta"):
        GlobalExplanationLoss().check_models(tree, linear)
    # a ProtoPNet teacher (4 prototypes) with a tree student (3): index pairing refused, matching accepted
    with pytest.raises(ValueError, match="student has 3 prototypes and the teacher 4"):
        GlobalExplanationLoss(pairing="index").check_models(tree, ppnet)
    GlobalExplanationLoss(pairing="matched_per_epoch").check_models(tree, ppnet)
    deep = _model(ProtoTreeHead(6, 4, depth=3, prototype_depth=7))
    with pytest.raises(ValueError, match="depth 5, teacher depth 7"):
        GlobalExplanationLoss(pairing="matched_fixed").check_models(tree, deep)


def test_hungarian_pairing_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    for ps, pt in ((4, 4), (3, 5), (5, 3)):
        s, t = torch.rand(ps, 6, generator=g), torch.rand(pt, 6, generator=g)
        cost = P.prototype_distance_matrix(s, t)
        si, ti = P.match_prototypes(s, t)
        m = min(ps, pt)
        assert len(si) == m and len(set(si.tolist())) == m and len(set(ti.tolist())) == m
        best = min(
            (sum(cost[i, j].item() for i, j in zip(rows, cols)), rows, cols)
            for rows in itertools.combinations(range(ps), m)
            for cols in itertools.permutations(range(pt), m)
        )
        assert cost[si, ti].sum().item() == pytest.approx(best[0], abs=1e-12)
        expect = sum(((s[i] - t[j]) ** 2).sum().sqrt() for i, j in zip(si.tolist(), ti.tolist())) / m
        assert P.paired_global_explanation_loss(s, t, si, ti).item() == pytest.approx(expect.item(), rel=1e-6)
    # identical layouts paired by index: the index loss
    s, t = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    ar = torch.arange(4)
    assert torch.equal(P.paired_global_explanation_loss(s, t, ar, ar), P.global_explanation_loss(s, t))


def test_fixed_matching_is_recomputed_in_the_first_phase_only():
    torch.manual_seed(2)
    student = _model(ProtoTreeHead(6, 4, depth=2, prototype_depth=5))
    teacher = _model(ProtoTreeHead(6, 4, depth=3, prototype_depth=5))
    init = student.head.prototypes.detach().clone()
    for pairing, frozen in (("matched_fixed", True), ("matched_per_epoch", False)):
        with torch.no_grad():
            student.head.prototypes.copy_(init)
        loss = GlobalExplanationLoss(pairing=pairing)
        loss.setup(SimpleNamespace(model=student, teacher=teacher))
        stage_state = StageState()
        loss.on_epoch_start(SimpleNamespace(phase="kd_warm", model=student, stage_state=stage_state))
        first = loss.teacher_index.clone()
        assert torch.equal(first, P.match_prototypes(student.head.prototypes, teacher.head.prototypes)[1])
        with torch.no_grad():
            student.head.prototypes.copy_(teacher.head.prototypes[[6, 5, 4]])  # now nearest to teacher 6, 5, 4
        loss.on_epoch_start(SimpleNamespace(phase="joint", model=student, stage_state=stage_state))
        assert torch.equal(loss.teacher_index, first) == frozen
        if not frozen:
            assert loss.teacher_index.tolist() == [6, 5, 4]
            assert loss(SimpleNamespace(model=student, teacher=teacher)).item() == 0.0
        assert set(loss.state_dict()) == {"student_index", "teacher_index"}  # saved in checkpoints


RESUME = (
    "checkpoint_every = 1\n"
    + DATA
    + """
[evaluate]
metrics = [{ name = "accuracy" }, { name = "tree_modes" }]

[stages.teacher]
model.backbone = { name = "tinyconv" }
model.head = { name = "prototree", depth = 3, prototype_depth = 8 }
losses = ["prototree_nll", "gate"]
[[stages.teacher.phases]]
name = "joint"
epochs = 1
limit_batches = 4
accumulate = 2
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
[[stages.teacher.phases]]
name = "prune"
kind = "prune"
threshold = 0.2

[stages.kd]
teacher = "teacher"
model.backbone = { name = "tinyconv" }
model.head = { name = "prototree", depth = 2, prototype_depth = 8 }
[stages.kd.losses]
prototree_nll = { weight = 1.0 }
global_explanation = { weight = 10.0, pairing = "matched_fixed" }
patch_prototype_correspondence = { weight = 10.0, tau = 1.0 }
gate = { weight = 1.0 }
[[stages.kd.phases]]
name = "kd_warm"
epochs = 1
limit_batches = 2
losses = ["global_explanation", "patch_prototype_correspondence", "gate"]
groups = [{ params = ["head.prototypes", "head.add_on"], lr = 1e-3 }]
[[stages.kd.phases]]
name = "joint"
epochs = 2
limit_batches = 4
accumulate = 2
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
[[stages.kd.phases]]
name = "project"
kind = "project"
figure = false
"""
)
# Gate-loss calls in a fresh process: teacher 1-4, kd_warm 5-6, kd joint 7-14.


def test_interrupt_mid_epoch_then_resume_is_bit_exact(tmp_path):
    recipe = tmp_path / "resume.toml"
    recipe.write_text(RESUME)
    env = plugin_env(make_gate_plugin(tmp_path / "site"), OMP_NUM_THREADS="1")
    ref, out = tmp_path / "reference", tmp_path / "interrupted"
    assert run(["run", str(recipe), "--out", str(ref), "-q"], env).returncode == 0
    # Ctrl-C in kd's joint phase, epoch 1 after batch 2 (an optimiser step): a mid-epoch checkpoint
    proc = run(["run", str(recipe), "--out", str(out), "-q"], {**env, "KDT_GATE_SIGINT": "8"})
    assert proc.returncode == 130, proc.stderr
    assert "phase 'joint', epoch 1, batch 2" in proc.stderr
    proc = run(["run", str(recipe), "--out", str(out), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(out, ref, ["teacher", "kd"])
    for stage in ("teacher", "kd"):
        ra, rb = (
            load_file(str(out / stage / "records.safetensors")),
            load_file(str(ref / stage / "records.safetensors")),
        )
        assert all(torch.equal(ra[k], rb[k]) for k in ra), stage
    la, lb = load_file(str(out / "kd" / "losses.safetensors")), load_file(str(ref / "kd" / "losses.safetensors"))
    assert set(la) == {"global_explanation/student_index", "global_explanation/teacher_index"}
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert not torch.equal(load_file(str(ref / "kd" / "model.safetensors"))["head.leaves"], torch.zeros(4, 10))


def test_shipped_prototree_recipe_validates_and_round_trips(tmp_path, capsys):
    import tomllib

    from kdtoolkit.cli.commands import main

    path = Path(__file__).resolve().parents[1] / "recipes" / "prototree.toml"
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.partition("\n")[0] == f"# {path}: valid; stages in order: teacher, baseline, kd, kd_no_global, kd_no_ppc"
    st = tomllib.loads(out)["stages"]
    ge = {s: next(l for l in st[s]["losses"] if l["id"] == "global_explanation") for s in ("kd", "kd_no_global")}
    assert ge["kd"]["pairing"] == "index" and ge["kd"]["weight"] == 1.0 and ge["kd_no_global"]["weight"] == 0.0
    joint = st["teacher"]["phases"][1]
    assert joint["optimizer"] == {
        "name": "adamw",
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-7,
        "amsgrad": False,
    }
    assert joint["scheduler"]["name"] == "multistep" and joint["scheduler"]["gamma"] == 0.5
    assert [p["kind"] for p in st["kd"]["phases"]] == ["train", "train", "prune", "project"]
    again = tmp_path / "resolved.toml"
    again.write_text(out)
    assert main(["validate", str(again)]) == 0


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_a_tree_exports_with_its_logits_and_predicts_with_nodes(tree_run, tmp_path, capsys, fmt):
    import warnings

    from kdtoolkit.cli.commands import main
    from kdtoolkit.use.rundir import StageDir

    *_, out, _, _ = tree_run
    path = tmp_path / "tree.model"
    assert main(["export", str(out / "kd"), "--format", fmt, "--out", str(path)]) == 0
    stage = StageDir.open(out / "kd")
    x = torch.stack([stage.data().test[i][0] for i in range(3)])
    with torch.no_grad():
        ref = stage.model("cpu")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.export.load(str(path)).module() if fmt == "exported-program" else torch.jit.load(str(path))
        got = loaded(x)
    assert torch.allclose(got["logits"], ref["logits"], atol=1e-5, rtol=0)
    assert torch.equal(got["greedy_prediction"], ref["greedy_prediction"])
    if fmt == "torchscript":
        return
    from PIL import Image

    img = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy()).save(img)
    capsys.readouterr()
    assert main(["predict", str(out / "kd"), str(img), "--top", "2", "--json", "-", "-q"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    nodes = row["top_prototypes"]
    assert len(nodes) == 2 and all(set(n) == {"prototype", "similarity", "location"} for n in nodes)
    assert 0 < nodes[1]["similarity"] <= nodes[0]["similarity"] <= 1
    kept = stage.model("cpu").head.node_kept
    assert main(["predict", str(out / "kd"), str(img), "--top", "99", "--json", "-", "-q"]) == 0
    nodes = json.loads(capsys.readouterr().out)[0]["top_prototypes"]
    assert len(nodes) == int(kept.sum()) and all(bool(kept[n["prototype"]]) for n in nodes)  # pruned nodes never listed
