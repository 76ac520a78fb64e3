"""The Proto2Proto bundle end to end on a tiny run, and its push phase."""

from __future__ import annotations

import json
import math
import shutil

import torch

from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.contracts import Model
from kdtoolkit.results.records import Records
from kdtoolkit.foundation.progress import Progress
from kdtoolkit.engine.data import StageData
from kdtoolkit.engine.context import StageState
from kdtoolkit.engine.phases import PhaseContext
from kdtoolkit.foundation.distributed import Dist
from kdt_protopnet import functional as F
from kdt_proto2proto import metrics as M
from kdt_protopnet.head import ProtoPNetHead
from kdt_protopnet.push import PushPhase

from kdt_testutil import proto_recipe, run_kdt


def test_tables_and_metrics_in_results(proto_run):
    _, out, results = proto_run
    stages = results["stages"]
    assert set(stages) == {"teacher", "baseline", "kd"}
    for r in stages.values():
        assert 0 <= r["accuracy"] <= 1
        assert set(r["aap"]) == {M.tau_key(t) for t in M.DEFAULT_TAUS}
        assert set(r["ajs"]) == set(r["aap"])
        assert r["state"]["pushed"] is True  # the evaluated model is the pushed one
    # a teacher compared with itself
    assert stages["teacher"]["ajs"]["inf"] == 1.0 and stages["teacher"]["pms"] == 1.0
    assert stages["baseline"]["reference"] == "teacher" and stages["kd"]["reference"] == "teacher"
    md = (out / "results.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "PMS" in md
    t2 = md[md.index("Table 2") :]
    # kd uses both KD losses, baseline none
    kd_row = next(l for l in t2.splitlines() if l.startswith("| kd |"))
    base_row = next(l for l in t2.splitlines() if l.startswith("| baseline |"))
    assert kd_row.count("✓") == 3 and base_row.count("✓") == 1


def test_kd_stage_reused_and_push_recorded(proto_run):
    _, out, results = proto_run
    hist = results["stages"]["kd"]["history"]
    assert [h["name"] for h in hist] == ["kd_warm", "joint", "push", "last_layer"]
    assert hist[0]["losses"] == ["global_explanation", "patch_prototype_correspondence"]
    push = json.loads((out / "kd" / "push-push.json").read_text())
    assert len(push["prototypes"]) == 20 and all(p["found"] for p in push["prototypes"])
    for p in push["prototypes"]:
        top, left, bottom, right = p["box"]
        assert 0 <= top <= bottom < 16 and 0 <= left <= right < 16  # inside the 16 px source image
    assert (out / "kd" / "prototypes-push.png").read_bytes()[:4] == b"\x89PNG"


def test_records_reproduce_run_metrics(proto_run):
    _, out, results = proto_run
    t = Records.load(out / "teacher" / "records.safetensors")
    s = Records.load(out / "kd" / "records.safetensors")
    L = t.meta["H"] * t.meta["W"]
    assert s.meta["stage"] == "kd" and s.n == t.n
    for tau in M.DEFAULT_TAUS:
        k = M.tau_key(tau)
        assert M.average_active_patches(s["min_distances"], s["argmin"], L, tau) == results["stages"]["kd"]["aap"][k]
        assert (
            M.average_jaccard_similarity(t["min_distances"], t["argmin"], s["min_distances"], s["argmin"], L, tau)
            == results["stages"]["kd"]["ajs"][k]
        )


def test_both_kd_losses_ablated_skips_stage_one(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    recipe = tmp_path / "r.toml"
    recipe.write_text(proto_recipe(ppc_weight=0.0, global_weight=0.0))
    # --force retrains the changed kd stage only; teacher and baseline are reused
    assert main(["run", str(recipe), "--out", str(run), "--force"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "phase 'kd_warm' skipped" in err
    assert "stage teacher: already complete" in err and "stage baseline: already complete" in err
    res = json.loads((run / "results.json").read_text())
    assert res["stages"]["kd"]["history"][0]["skipped"]
    assert res["stages"]["kd"]["losses"]["global_explanation"] == 0.0


def test_prototype_count_mismatch_is_refused_before_training(tmp_path):
    recipe = tmp_path / "r.toml"
    text = proto_recipe()
    # the kd student gets 3 prototypes per class: the global explanation loss cannot pair them
    head = 'model.head = { name = "protopnet", prototypes_per_class = 2, prototype_depth = 16 }'
    last = text.rindex(head)
    text = text[:last] + head.replace("= 2", "= 3") + text[last + len(head) :]
    text = text.replace('model.init_from_teacher = ["head.last_layer"]\n', "")
    recipe.write_text(text)
    r = run_kdt("run", str(recipe), "--out", str(tmp_path / "run"), "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages.kd.losses[4]" in r.stderr and "global_explanation" in r.stderr
    assert not (tmp_path / "run" / "kd").exists()


class _Backbone(torch.nn.Module):
    out_channels = 4
    reduction = 1

    def forward(self, x):
        return x[:, :4]


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=23, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 4, 3, 3, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.y[:3] = torch.tensor([0, 1, 2])
        self.num_classes = 3
        self.name = "toy"

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_push_phase_equals_brute_force_nearest_patch_of_own_class():
    torch.manual_seed(0)
    head = ProtoPNetHead(4, 3, prototypes_per_class=2, prototype_depth=5)
    model = Model(_Backbone(), head)
    data = _Data()
    ctx = PhaseContext(
        "s",
        {"name": "push", "kind": "push"},
        model,
        None,
        StageData(data, data, data, {"eval_batch_size": 5, "num_workers": 0}),
        torch.device("cpu"),
        Progress(enabled=False),
        0,
        Dist(),
        state=StageState(),
    )
    with torch.no_grad():
        z_all = head.latent(data.x)  # [N, D, H, W]
        old = head.prototypes.detach().clone()
    PushPhase(batch_size=5).run(ctx)
    assert ctx.state.values == {"pushed": True} and ctx.state.watch == {"pushed": "head.prototypes"}
    N, D, H, W = z_all.shape
    for j in range(head.num_prototypes):
        cls = j // 2
        best, best_vec = math.inf, None
        for i in range(N):
            if int(data.y[i]) != cls:
                continue
            for h in range(H):
                for w in range(W):
                    d = float(((z_all[i, :, h, w] - old[j]) ** 2).sum())
                    if d < best:
                        best, best_vec = d, z_all[i, :, h, w]
        assert torch.allclose(head.prototypes[j], best_vec, atol=1e-6), j


def test_push_memory_does_not_grow_with_the_dataset():
    """The projector's state is O(P·D): the same tensors whatever the number of batches."""
    proto = torch.rand(6, 5)
    proj = F.PrototypeProjector(proto, None)
    sizes = []
    for b in range(4):
        proj.update(torch.rand(8, 5, 3, 3), torch.zeros(8, dtype=torch.long), torch.arange(8) + 8 * b)
        sizes.append(sum(t.numel() for t in vars(proj).values() if isinstance(t, torch.Tensor)))
    assert len(set(sizes)) == 1
