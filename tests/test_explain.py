"""``kdt explain``: receptive fields, activation boxes, flags, the four figures and their consistency with evaluation.

The stage-level tests read a copy of the session's tiny Proto2Proto run
(``proto_run``); the ProtoTree paths run on a small hand-built model and
dataset (a tree run would cost more than the whole file may).
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdt_proto2proto import explain_figures as EF
from kdt_proto2proto.explain import explain_global
from kdt_proto2proto.explain_stage import LoadedStage, load_stage
from kdt_protopnet import explain as X
from kdt_protopnet.figures import activation_box
from kdt_protopnet.head import ProtoPNetHead
from kdt_protopnet.receptive_field import RFInfo, backbone_layers, proto_layer_rf_info, rf_box
from kdt_protopnet.sheet import GAP, LINE, TILE
from kdt_prototree.head import ProtoTreeHead
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.contracts import Model
from kdtoolkit.use.rundir import StageDir
from kdtoolkit.results.records import Records


@pytest.fixture(scope="module")
def run_copy(proto_run, tmp_path_factory):
    """A copy of the tiny run, so that explanations and matchings never touch the shared one."""
    _, out, results = proto_run
    dst = tmp_path_factory.mktemp("explain") / "run"
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("explanations", "pms_matching_*"))
    return dst, results


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# -- receptive field and boxes ------------------------------------------------


def _stack() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(8, 8, 3, 2, 1))


def test_receptive_field_follows_protopnet_formula_for_a_conv_stack():
    # by hand, from [n, j, r, start] = [32, 1, 1, 0.5]:
    # conv k3 s1 p1 -> [32, 1, 3, 0.5]; maxpool k2 s2 -> [16, 2, 4, 1.0]; conv k3 s2 p1 -> [8, 4, 8, 1.0]
    assert backbone_layers(_stack(), 32) == ([3, 2, 3], [1, 2, 2], [1, 0, 1])
    info = proto_layer_rf_info(32, [3, 2, 3], [1, 2, 2], [1, 0, 1])
    assert info == RFInfo(n=8, j=4, r=8, start=1.0)
    # centre of (h, w) = start + j·(h, w); range [max(int(c − r/2), 0), min(int(c + r/2), 32)), end made inclusive
    assert rf_box(32, 2, 5, info) == (5, 17, 12, 24)
    assert rf_box(32, 0, 0, info) == (0, 0, 4, 4)
    assert rf_box(32, 7, 7, info) == (25, 25, 31, 31)
    assert _stack()(torch.zeros(1, 3, 32, 32)).shape[-1] == info.n


def test_receptive_field_of_a_timm_resnet_leaves_out_the_shortcuts():
    import timm

    body = timm.create_model("resnet10t", features_only=True, out_indices=(2,))
    # deep stem (three 3x3 convs, the first with stride 2), max-pool, layer1 (two 3x3), layer2 (3x3 stride 2, 3x3);
    # layer2's downsample shortcut (avg-pool + 1x1 conv) runs in parallel and is not on the list
    kernels, strides, paddings = backbone_layers(body, 56)
    assert (kernels, strides, paddings) == ([3] * 8, [2, 1, 1, 2, 1, 1, 2, 1], [1] * 8)
    info = proto_layer_rf_info(56, kernels, strides, paddings)
    assert info == RFInfo(n=7, j=8, r=55, start=0.5)
    assert rf_box(56, 0, 0, info) == (0, 0, 27, 27) and rf_box(56, 3, 3, info) == (0, 0, 51, 51)


def test_high_activation_box_contains_the_argmax_of_the_upsampled_map():
    gen = torch.Generator().manual_seed(0)
    for grid, size in ((2, 16), (7, 56), (4, 32), (3, 50)):
        for _ in range(5):
            act = torch.rand(grid, grid, generator=gen) * 5
            top, left, bottom, right = activation_box(act, (size, size))
            up = X.upsample_map(act, (size, size))
            y, x = np.unravel_index(np.argmax(up), up.shape)
            assert top <= y <= bottom and left <= x <= right
            # the box is the bounding box of the pixels at or above the 95th percentile
            ys, xs = np.nonzero(up >= np.quantile(up, 0.95))
            assert (top, left, bottom, right) == (ys.min(), xs.min(), ys.max(), xs.max())


def test_patch_flags_on_constant_and_textured_patches():
    act = np.array([[1.0, 2.0], [3.0, 9.0]])
    flat = X.patch_flags(np.zeros((16, 16, 3)), (0, 0, 7, 7), act)
    assert set(flat["flags"]) == {"constant patch", "background"} and flat["patch_std"] == 0
    board = np.indices((16, 16)).sum(0)[..., None].repeat(3, -1) % 2 * 1.0
    assert X.patch_flags(board, (4, 4, 11, 11), act)["flags"] == []
    assert X.patch_flags(board, (4, 4, 11, 11), np.ones((2, 2)))["flags"] == ["flat activation"]


# -- hand-built models: flags, the tree's greedy path --------------------------


class _Blobs(torch.utils.data.Dataset):
    """32 px images: a dark background with a textured bright square, two classes."""

    classes = ["a", "b"]

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for k in range(4):
            img = torch.zeros(3, 32, 32)
            y0, x0 = 10 + k, 12 - k
            img[:, y0 : y0 + 10, x0 : x0 + 10] = 0.5 + 0.5 * torch.rand(1, 10, 10, generator=g)
            self.items.append((img, k % 2))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _fake_stage(head, tmp_path) -> LoadedStage:
    torch.manual_seed(0)
    model = Model(_stack(), head).eval()
    ds = _Blobs()
    stage = SimpleNamespace(
        name="synthetic", path=tmp_path, result={"history": [], "state": {}}, file=lambda n: tmp_path / n
    )
    return LoadedStage(
        stage, model, SimpleNamespace(test=ds, train_eval=ds, spec={"eval_batch_size": 4}), torch.device("cpu")
    )


@torch.no_grad()
def test_a_prototype_on_the_constant_background_is_flagged(tmp_path):
    torch.manual_seed(0)
    ld = _fake_stage(ProtoPNetHead(8, 2, prototypes_per_class=1, prototype_depth=4), tmp_path)
    z = ld.model.head.latent(ld.model.backbone(ld.data.train_eval[0][0][None]))[0]
    ld.model.head.prototypes.copy_(torch.stack([z[:, 0, 0], z[:, 4, 4]]))  # a corner of the background; the square
    sources = [X.PrototypeSource(0, 0, 0, 0, classes=[0]), X.PrototypeSource(1, 0, 4, 4, classes=[1])]
    views = X.explain_prototypes(ld.model, ld.data.train_eval, sources, ld.rf_info())
    assert views[0].flags and not views[1].flags
    assert views[1].rf_box == rf_box(32, 4, 4, ld.rf_info()) == (13, 13, 20, 20)
    for v in views:  # the recomputed activation peaks at the projected location
        assert np.unravel_index(np.argmax(v.act), v.act.shape) == (v.source.h, v.source.w) or v.flags
    info = explain_global(ld, tmp_path / "g")
    assert info["flagged"] == [0] and info["source"].startswith("the prototypes were never pushed")
    assert _size(tmp_path / "g" / "prototypes.png") == tuple(info["figures"][0]["size"])


@torch.no_grad()
def test_greedy_path_follows_the_heads_greedy_mode_with_pruned_nodes():
    torch.manual_seed(0)
    head = ProtoTreeHead(8, 3, depth=3, prototype_depth=4, leaves="gradient").eval()
    f = torch.rand(16, 8, 3, 3) * 3
    for forced in (None, [-1, 0, -1, -1, 1, -1, -1]):
        if forced:
            head.forced.copy_(torch.tensor(forced))
        out = head(f)
        greedy = head.predict(f, "greedy")
        for b in range(f.shape[0]):
            path = X.greedy_path(head, out["min_distances"][b])
            assert path["leaf"] == int(greedy["leaf"][b])
            assert sum(not n["forced"] for n in path["nodes"]) == int(greedy["path_length"][b])
            assert int(path["distribution"].argmax()) == int(out["greedy_prediction"][b])


@torch.no_grad()
def test_tree_local_explanation_draws_the_greedy_path(tmp_path):
    from kdt_proto2proto.explain_local import explain_local

    ld = _fake_stage(ProtoTreeHead(8, 2, depth=2, prototype_depth=4, leaves="gradient"), tmp_path)
    info = explain_local(ld, "1", 3, tmp_path / "e")
    out = ld.model(ld.data.test[1][0][None])
    assert info["prediction"] == int(out["logits"].argmax()) and info["label"] == 1
    assert [n["node"] for n in info["path"]][0] == 0 and len(info["path"]) == 2
    assert info["greedy_prediction"] == int(out["greedy_prediction"][0])
    assert _size(tmp_path / "e" / "test-1.png") == tuple(info["size"])


# -- the command on a finished run --------------------------------------------


def test_global_gallery_of_a_pushed_stage(run_copy, tmp_path, capsys):
    run, _ = run_copy
    assert main(["explain", str(run / "teacher"), "--global", "--out", str(tmp_path), "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "prototypes.json").read_text())
    printed = capsys.readouterr().out
    assert "explanation:" in printed and "flagged prototypes:" in printed
    assert info["source"] == "projected training patches from push-push.json"
    push = json.loads((run / "teacher" / "push-push.json").read_text())["prototypes"]
    assert [(p["prototype"], p["image"], p["h"], p["w"]) for p in info["prototypes"]] == [
        (p["prototype"], p["image"], p["h"], p["w"]) for p in push
    ]
    # 20 prototypes of 16 px digits: tiles enlarged 8x to 128 px, 4 prototypes (3 tiles each) a row, 5 rows
    side = 16 * 8
    assert side >= TILE
    width, height = _size(tmp_path / "prototypes.png")
    assert width == 2 * EF.MARGIN + 4 * (3 * side + 6 * GAP) and [width, height] == info["figures"][0]["size"]
    assert height > 5 * (2 * LINE + side)
    for p in info["prototypes"]:
        flagged = (
            p["patch_std"] < X.MIN_PATCH_STD
            or p["background_fraction"] >= X.MAX_BACKGROUND_FRACTION
            or p["flat_fraction"] > X.MAX_FLAT_FRACTION
        )
        assert bool(p["flags"]) == flagged and (p["prototype"] in info["flagged"]) == flagged
        assert p["rf_box"] == [0, 0, 15, 15]  # a 2x2 grid at stride 8 sees the whole 16 px image
    ld = load_stage(StageDir.open(run / "teacher"), "cpu")
    from kdt_proto2proto.explain_stage import prototype_sources, prototype_views

    for v in prototype_views(ld, prototype_sources(ld)[0][:6]):
        y, x = np.unravel_index(np.argmax(v.up), v.up.shape)
        assert v.box[0] <= y <= v.box[2] and v.box[1] <= x <= v.box[3]


def test_local_prediction_is_the_evaluated_one(run_copy, tmp_path):
    from kdt_proto2proto.explain_local import explain_local

    run, _ = run_copy
    ld = load_stage(StageDir.open(run / "kd"), "cpu")
    recs = Records.load(run / "kd" / "records.safetensors")
    for idx in (0, 5, 17):
        info = explain_local(ld, str(idx), 4, tmp_path)
        assert info["prediction"] == int(recs["logits"][idx].argmax()) == info["recorded_prediction"]
        assert info["label"] == int(recs["labels"][idx])
        assert len(info["top"]) == 4
        sims = [t["similarity"] for t in info["top"]]
        assert sims == sorted(sims, reverse=True)
        for t in info["top"]:
            assert t["contribution"] == pytest.approx(t["similarity"] * t["weight"], rel=1e-5)
        # 16 px digits: 128 px tiles, three a row, then the text column
        assert _size(tmp_path / f"test-{idx}.png") == tuple(info["size"])
        assert info["size"][0] == 2 * EF.MARGIN + 3 * (128 + GAP) + 380


def test_local_explanation_of_an_image_file(run_copy, tmp_path, capsys):
    run, _ = run_copy
    img = tmp_path / "seven.png"
    Image.fromarray((np.eye(8)[::-1] * 255).astype("uint8")).resize((32, 32)).save(img)
    assert (
        main(["explain", str(run / "kd"), "--image", str(img), "--top", "2", "--out", str(tmp_path), "--device", "cpu"])
        == 0
    )
    info = json.loads((tmp_path / "image-seven.json").read_text())
    assert info["label"] is None and info["recorded_prediction"] is None and len(info["top"]) == 2
    assert (tmp_path / "image-seven.png").is_file()


def test_compare_and_pairs(run_copy, tmp_path):
    run, _ = run_copy
    assert (
        main(
            [
                "explain",
                str(run),
                "--compare",
                "teacher,baseline,kd",
                "--image",
                "3",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "compare-test-3.json").read_text())
    for name in ("teacher", "baseline", "kd"):
        recs = Records.load(run / name / "records.safetensors")
        assert info["models"][name]["prediction"] == int(recs["logits"][3].argmax())
        assert len(info["models"][name]["top"]) == 3
    assert _size(tmp_path / "compare-test-3.png") == tuple(info["size"])
    assert main(["explain", str(run), "--pairs", "kd", "--top", "3", "--out", str(tmp_path), "--device", "cpu"]) == 0
    pairs = json.loads((tmp_path / "pairs-kd.json").read_text())
    matching = json.loads((run / "kd" / "pms_matching_vs_teacher.json").read_text())  # computed: it was missing
    assert pairs["score"] == matching["score"] and len(pairs["best"]) == len(pairs["worst"]) == 3
    best, worst = [p["sim"] for p in pairs["best"]], [p["sim"] for p in pairs["worst"]]
    assert best == sorted(best, reverse=True) and worst == sorted(worst) and min(best) >= max(worst)
    caps = matching["caps"]
    for p in pairs["best"] + pairs["worst"]:  # the stored sim is the cap-averaged min(1, I_ij / M)
        assert p["sim"] == pytest.approx(sum(min(1.0, p["colocated"] / m) for m in caps) / len(caps))
        assert p["teacher_classes"] == [p["teacher_prototype"] // 2] and p["student_classes"] == [
            p["student_prototype"] // 2
        ]
    assert _size(tmp_path / "pairs-kd.png") == tuple(pairs["size"])
    assert matching["student_stage_hash"] == Records.load(run / "kd" / "records.safetensors").meta["stage_hash"]
    stale = {**matching, "student_stage_hash": "another-training", "score": -1.0}  # as if kd had been trained again
    (run / "kd" / "pms_matching_vs_teacher.json").write_text(json.dumps(stale))
    assert main(["explain", str(run), "--pairs", "kd", "--top", "3", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "pairs-kd.json").read_text())["score"] == matching["score"]  # recomputed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--global", "--pairs", "kd"], "give one of"),
        (["--compare", "teacher,kd"], "--compare needs --image"),
        ([], "say what to explain"),
        (["--image", "100000"], "out of range"),
        (["--image", "nope.png"], "neither an image file nor a test index"),
    ],
)
def test_usage_errors_are_one_line(run_copy, capsys, args, message):
    run, _ = run_copy
    path = run if "--compare" in args else run / "kd"
    assert main(["explain", str(path), *args, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_training_curves_mark_the_phases(run_copy):
    from kdtoolkit.results.report import epoch_logs, phase_marks

    run, results = run_copy
    rows = epoch_logs(run, ["teacher"])["teacher"]
    marks = phase_marks(results["stages"]["teacher"]["history"], rows)
    assert marks == [(0.5, "warm", True), (1.5, "joint", True), (2.5, "push", False), (2.5, "last_layer", True)]
    kd = phase_marks(results["stages"]["kd"]["history"], epoch_logs(run, ["kd"])["kd"])
    assert [m[1] for m in kd] == ["kd_warm", "joint", "push", "last_layer"]
    # the run's training.png: the two overview panels, then one panel per stage (two a row): 11 x (4 + 2·3.2) in
    assert _size(run / "training.png") == (1100, 1040)


def test_explain_takes_data_changes_and_refuses_bad_ones(run_copy, tmp_path, capsys):
    run, _ = run_copy
    assert (
        main(
            [
                "explain",
                str(run / "kd"),
                "--image",
                "3",
                "--data",
                "eval_batch_size=7",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["explain", str(run / "kd"), "--image", "3", "--data", "nosuch=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data: data.nosuch: unknown key" in err and err.count("\n") == 1


def test_compare_naming_no_stage_is_one_line(tmp_path, capsys):
    """`--compare ","` names no stage: one line, exit 2, before the run directory is read."""
    code = main(["explain", str(tmp_path), "--compare", " , ", "--image", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "kdt: error: kdt explain: --compare names no stage (got ' , '); e.g. --compare teacher,kd"
    ]
