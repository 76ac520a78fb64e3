"""The loss components of the standard KD methods (plugins/kdt_classic/losses.py).

Each component on a hand-made Step equals its pure function (the components
are thin), sends gradients to the student's tensors and never to the
teacher's; FitNets, AT and CRD run in a tiny real recipe, where the FitNets
regressor and the CRD memory train, are saved in ``losses.safetensors`` and
survive an interruption and resume bit-exactly; a loss naming an undeclared
tap is a one-line recipe error.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from kdt_classic import functional as KF
from kdt_classic.crd import CRD
from kdt_classic.losses import (
    AttentionLoss,
    CRDLoss,
    DISTLoss,
    DKDLoss,
    FitNetLoss,
    HintonKDLoss,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)
from kdtoolkit.foundation.checkpoint import load_checkpoint
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.contracts import Step
from kdtoolkit.engine.losses import declared_taps
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, get_manager, set_manager

from kdt_testutil import TINY_DATA

B, K = 8, 10


def _step(seed: int = 0, epoch: int = 1, grad: bool = True) -> Step:
    """A fake step: logits, labels, student and teacher taps, indices; every tensor a leaf with gradients."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    feats = {"f": leaf(B, 16, 8, 8), "g": leaf(B, 32, 4, 4), "emb": leaf(B, 16)}
    tfeats = {"f": leaf(B, 24, 4, 4), "g": leaf(B, 48, 4, 4), "emb": leaf(B, 24)}
    return Step(
        inputs=torch.zeros(B, 3, 16, 16),
        targets=torch.randint(0, K, (B,), generator=g),
        outputs={"logits": leaf(B, K)},
        model=None,
        teacher_outputs={"logits": leaf(B, K)},
        teacher=None,
        features=feats,
        teacher_features=tfeats,
        indices=torch.randperm(40, generator=g)[:B],
        epoch=epoch,
        phase="train",
    )


def _teacher_tensors(step: Step) -> list[torch.Tensor]:
    return [step.teacher_outputs["logits"], *step.teacher_features.values()]


def _student_tensors(step: Step) -> list[torch.Tensor]:
    return [step.outputs["logits"], *step.features.values()]


def _probe(step: Step, num_train: int | None = 40) -> Step:
    probe = Step(
        step.inputs,
        step.targets,
        {k: v.detach() for k, v in step.outputs.items()},
        None,
        teacher_features={k: v.detach() for k, v in step.teacher_features.items()},
        features={k: v.detach() for k, v in step.features.items()},
        indices=torch.arange(B),
        phase="setup",
    )
    if num_train is not None:
        probe.num_train = num_train
    return probe


# --------------------------------------------------------------------------
# thin: each component equals its pure function
# --------------------------------------------------------------------------


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_equals_kd_loss(standardize):
    s = _step()
    got = HintonKDLoss(temperature=3.0, standardize=standardize)(s)
    want = KF.kd_loss(s.outputs["logits"], s.teacher_outputs["logits"], 3.0, standardize=standardize)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kd_and_hinton_kd_are_the_same_component():
    reg = get_manager().registry("loss")
    assert reg.get("kd").factory is reg.get("hinton_kd").factory is HintonKDLoss
    assert reg.get("kd").params["standardize"].default is False


@pytest.mark.parametrize("epoch,warmup,ramp", [(1, 4, 0.25), (2, 4, 0.5), (9, 4, 1.0), (1, 0, 1.0), (1, 20, 0.05)])
def test_dkd_equals_dkd_loss_with_the_warmup_ramp(epoch, warmup, ramp):
    s = _step(epoch=epoch)
    got = DKDLoss(alpha=0.5, beta=8.0, temperature=4.0, warmup_epochs=warmup)(s)
    want = KF.dkd_loss(s.outputs["logits"], s.teacher_outputs["logits"], s.targets, 0.5, 8.0, 4.0) * ramp
    torch.testing.assert_close(got, want)


def test_dist_equals_dist_loss():
    s = _step()
    got = DISTLoss(beta=2.0, gamma=0.5, temperature=4.0)(s)
    torch.testing.assert_close(got, KF.dist_loss(s.outputs["logits"], s.teacher_outputs["logits"], 2.0, 0.5, 4.0))
    assert DISTLoss().temperature == 1.0 and DISTLoss().beta == DISTLoss().gamma == 1.0


def test_fitnet_builds_its_regressor_from_the_probe_and_equals_fitnet_loss():
    s = _step()
    loss = FitNetLoss(student_tap="f", teacher_tap="f")
    assert not list(loss.parameters())
    loss.setup(_probe(s))
    conv = loss.regressor.conv
    assert (conv.in_channels, conv.out_channels, conv.stride) == (16, 24, (2, 2))  # 8x8 -> 4x4: stride 2
    got = loss(s)
    torch.testing.assert_close(got, KF.fitnet_loss(loss.regressor(s.features["f"]), s.teacher_features["f"]))
    assert declared_taps(FitNetLoss, "requires_taps", {"student_tap": "f", "teacher_tap": "t"}) == ("f",)
    assert declared_taps(loss, "requires_teacher_taps", {"student_tap": "f", "teacher_tap": "t"}) == ("t",)


def test_attention_equals_at_loss_over_the_pairs():
    s = _step()
    loss = AttentionLoss(taps=["f", "g"], teacher_taps=["f", "g"], p=2.0)
    want = KF.at_loss([s.features["f"], s.features["g"]], [s.teacher_features["f"], s.teacher_features["g"]], 2.0)
    torch.testing.assert_close(loss(s), want)
    params = {"taps": ["f", "g"], "teacher_taps": ["a", "b"], "p": 2.0}
    assert declared_taps(AttentionLoss, "requires_taps", params) == ("f", "g")
    assert declared_taps(AttentionLoss, "requires_teacher_taps", params) == ("a", "b")


@pytest.mark.parametrize(
    "cls,fn,kw",
    [
        (SimilarityPreservingLoss, KF.sp_loss, {}),
        (PKTLoss, KF.pkt_loss, {}),
        (RKDLoss, KF.rkd_loss, {"distance_weight": 10.0, "angle_weight": 20.0}),
    ],
)
def test_relational_losses_equal_their_functions(cls, fn, kw):
    s = _step()
    for st, tt in (("emb", "emb"), ("g", "f")):
        got = cls(student_tap=st, teacher_tap=tt, **kw)(s)
        want = fn(s.features[st], s.teacher_features[tt], *kw.values())
        torch.testing.assert_close(got, want)


def test_rkd_defaults():
    assert (
        RKDLoss(student_tap="a", teacher_tap="b").distance_weight,
        RKDLoss(student_tap="a", teacher_tap="b").angle_weight,
    ) == (25.0, 50.0)


def test_crd_builds_from_the_probe_and_equals_the_crd_module():
    s = _step()
    loss = CRDLoss(student_tap="g", teacher_tap="emb", feat_dim=8, nce_k=5)
    torch.manual_seed(3)
    loss.setup(_probe(s, num_train=40))
    torch.manual_seed(3)
    ref = CRD(32 * 4 * 4, 24, 40, feat_dim=8, nce_k=5)
    assert loss.crd.memory_s.shape == (40, 8)
    torch.manual_seed(4)
    got = loss(s)
    torch.manual_seed(4)
    want = ref(s.features["g"], s.teacher_features["emb"], s.indices)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(loss.crd.memory_t, ref.memory_t)
    assert set(loss.state_dict()) >= {"crd.memory_s", "crd.memory_t", "crd.z", "crd.embed_s.linear.weight"}


def test_crd_needs_the_number_of_training_images_and_fewer_negatives():
    s = _step()
    with pytest.raises(ValueError, match="number of training images"):
        CRDLoss(student_tap="emb", teacher_tap="emb").setup(_probe(s, num_train=None))
    with pytest.raises(ValueError, match="nce_k = 16384 negatives, but there are only 40"):
        CRDLoss(student_tap="emb", teacher_tap="emb").setup(_probe(s, num_train=40))


# --------------------------------------------------------------------------
# gradients reach the student, never the teacher
# --------------------------------------------------------------------------


def _built(name: str, s: Step):
    loss = {
        "kd": lambda: HintonKDLoss(),
        "kd_ls": lambda: HintonKDLoss(standardize=True),
        "dkd": lambda: DKDLoss(),
        "dist": lambda: DISTLoss(),
        "fitnet": lambda: FitNetLoss(student_tap="f", teacher_tap="f"),
        "attention": lambda: AttentionLoss(taps=["f", "g"], teacher_taps=["f", "g"]),
        "sp": lambda: SimilarityPreservingLoss(student_tap="g", teacher_tap="g"),
        "pkt": lambda: PKTLoss(student_tap="emb", teacher_tap="emb"),
        "rkd": lambda: RKDLoss(student_tap="emb", teacher_tap="emb"),
        "crd": lambda: CRDLoss(student_tap="emb", teacher_tap="emb", feat_dim=8, nce_k=5),
    }[name]()
    if hasattr(loss, "setup"):
        loss.setup(_probe(s))
    return loss


@pytest.mark.parametrize("name", ["kd", "kd_ls", "dkd", "dist", "fitnet", "attention", "sp", "pkt", "rkd", "crd"])
def test_gradients_reach_the_student_and_never_the_teacher(name):
    s = _step()
    loss = _built(name, s)
    value = loss(s)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in _student_tensors(s))
    assert all(t.grad is None for t in _teacher_tensors(s)), "a gradient reached the teacher"
    if isinstance(loss, torch.nn.Module):
        trained = [p for p in loss.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert trained, "the connector gets no gradient"


@pytest.mark.parametrize(
    "cls,params,key",
    [
        (HintonKDLoss, {"temperature": 0.0, "standardize": False}, "temperature"),
        (DKDLoss, {"alpha": 1.0, "beta": -1.0, "temperature": 4.0, "warmup_epochs": 20}, "beta"),
        (DKDLoss, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": -1}, "warmup_epochs"),
        (DISTLoss, {"beta": 1.0, "gamma": 1.0, "temperature": -2.0}, "temperature"),
        (FitNetLoss, {"student_tap": "", "teacher_tap": "t"}, "student_tap"),
        (AttentionLoss, {"taps": ["a", "b"], "teacher_taps": ["a"], "p": 2.0}, "teacher_taps"),
        (AttentionLoss, {"taps": [], "teacher_taps": [], "p": 2.0}, "taps"),
        (AttentionLoss, {"taps": ["a"], "teacher_taps": ["a"], "p": 0.0}, "p"),
        (
            RKDLoss,
            {"student_tap": "a", "teacher_tap": "b", "distance_weight": -1.0, "angle_weight": 50.0},
            "distance_weight",
        ),
        (
            CRDLoss,
            {"student_tap": "a", "teacher_tap": "b", "feat_dim": 128, "nce_k": 0, "nce_t": 0.07, "nce_m": 0.5},
            "nce_k",
        ),
        (
            CRDLoss,
            {"student_tap": "a", "teacher_tap": "b", "feat_dim": 128, "nce_k": 8, "nce_t": 0.07, "nce_m": 1.5},
            "nce_m",
        ),
    ],
)
def test_check_params_names_the_bad_key(cls, params, key):
    with pytest.raises(ValueError) as info:
        cls.check_params(params)
    assert info.value.args[0] == key


# --------------------------------------------------------------------------
# a tiny real recipe: FitNets, AT, CRD; saved state; interruption and resume
# --------------------------------------------------------------------------

TAPS = """
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
model.taps = { f = "backbone.body.layer1", g = "backbone.body.layer2", emb = "head.dropout" }
teacher_taps = { f = "backbone.body.layer1", g = "backbone.body.layer2", emb = "head.dropout" }
"""

RECIPE = (
    "seed = 1\n"
    + TINY_DATA
    + """
[stages.teacher]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 1
limit_batches = 2
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]

[stages.fitnet]
teacher = "teacher"
"""
    + TAPS
    + """
losses = [{ name = "cross_entropy" }, { name = "fitnet", weight = 10.0, student_tap = "f", teacher_tap = "g" }]
[[stages.fitnet.phases]]
epochs = 1
limit_batches = 2
groups = [{ params = ["backbone", "head", "loss.fitnet"], lr = 1e-3 }]

[stages.at]
teacher = "teacher"
"""
    + TAPS
    + """
losses = [
    { name = "cross_entropy" },
    { name = "attention", weight = 100.0, taps = ["f", "g"], teacher_taps = ["f", "g"] },
]
[[stages.at.phases]]
epochs = 1
limit_batches = 2
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]

[stages.crd]
teacher = "teacher"
"""
    + TAPS
    + """
losses = [
    { name = "cross_entropy" },
    { name = "crd", weight = 0.8, student_tap = "emb", teacher_tap = "emb", nce_k = 64 },
    { name = "interrupter" },
]
[[stages.crd.phases]]
epochs = 2
limit_batches = 2
groups = [{ params = ["backbone", "head", "loss.crd"], lr = 1e-3 }]
"""
)

_INTERRUPT = {"at": None, "calls": 0}


class _Interrupter:
    @hookimpl
    def kdt_register_losses(self, registry):
        class Interrupter:
            """Sends this process a SIGINT (as Ctrl-C would) on its N-th call; contributes nothing."""

            requires_teacher = False
            requires_outputs = ("logits",)

            def __call__(self, step):
                _INTERRUPT["calls"] += 1
                if _INTERRUPT["calls"] == _INTERRUPT["at"]:
                    os.kill(os.getpid(), signal.SIGINT)
                return step.outputs["logits"].sum() * 0.0

        registry.add("interrupter", Interrupter)


def _run(recipe, out, interrupt_at=None):
    _INTERRUPT.update(at=interrupt_at, calls=0)
    set_manager(PluginManager(extra=[(_Interrupter(), "interrupter")]))
    try:
        return main(["run", str(recipe), "--out", str(out), "-q"])
    finally:
        set_manager(None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd_losses")
    recipe = d / "methods.toml"
    recipe.write_text(RECIPE)
    out = d / "reference"
    assert _run(recipe, out) == 0
    return recipe, out


def test_fitnet_regressor_is_trained_and_saved(reference):
    _, out = reference
    state = load_file(str(out / "fitnet" / "losses.safetensors"))
    assert {"fitnet/regressor.conv.weight", "fitnet/regressor.bn.weight", "fitnet/regressor.bn.running_mean"} <= set(
        state
    )
    # 4x4 student layer1 (64 channels) onto the 2x2 teacher layer2 (128 channels): stride-2 3x3 convolution
    assert state["fitnet/regressor.conv.weight"].shape == (128, 64, 3, 3)
    assert int(state["fitnet/regressor.bn.num_batches_tracked"]) == 2  # two training steps
    assert not torch.equal(state["fitnet/regressor.bn.weight"], torch.ones(128))  # moved from its init
    assert state["fitnet/regressor.bn.running_mean"].abs().sum() > 0
    model = load_file(str(out / "fitnet" / "model.safetensors"))
    assert not any("regressor" in k for k in model)  # the student's file holds the student only


def test_attention_stage_trains_without_loss_state(reference):
    _, out = reference
    assert (out / "at" / "result.json").is_file()
    assert not (out / "at" / "losses.safetensors").exists()


def test_crd_memory_is_trained_and_saved(reference):
    _, out = reference
    state = load_file(str(out / "crd" / "losses.safetensors"))
    n = 1438  # digits training images at the default test_fraction (1797 - 359)
    assert state["crd/crd.memory_s"].shape == (n, 128) and state["crd/crd.memory_t"].shape == (n, 128)
    assert (state["crd/crd.z"] > 0).all()
    # rows of the images seen (2 epochs x 2 batches x 32) were written (unit norm); the others keep their init
    unit = ((state["crd/crd.memory_s"].norm(dim=1) - 1).abs() < 1e-4).sum()
    assert 32 < int(unit) <= 128


def test_interrupted_crd_stage_resumes_bit_identically(reference, tmp_path):
    recipe, ref = reference
    out = tmp_path / "run"
    out.mkdir()
    for stage in ("teacher", "fitnet", "at"):  # reused: only the CRD stage trains
        shutil.copytree(ref / stage, out / stage)
    assert _run(recipe, out, interrupt_at=3) == 130  # epoch 2, batch 1 of the CRD stage
    ck = load_checkpoint(out / "crd" / "checkpoint.safetensors")
    assert (ck.epoch, ck.batch) == (1, 1)
    assert {"crd/crd.memory_s", "crd/crd.memory_t", "crd/crd.z", "crd/crd.embed_s.linear.weight"} <= set(ck.losses)
    assert (ck.losses["crd/crd.z"] > 0).all()
    assert _run(recipe, out) == 0
    for f in ("model.safetensors", "losses.safetensors"):
        a, b = load_file(str(out / "crd" / f)), load_file(str(ref / "crd" / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{f}: {k}"


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def test_a_loss_reading_an_undeclared_tap_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(RECIPE.replace('student_tap = "f", teacher_tap = "g"', 'student_tap = "nope", teacher_tap = "g"'))
    assert _run(recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "nope" in err and "model.taps" in err and "stages.fitnet.losses[1]" in err
    assert not (tmp_path / "out").exists()


def test_crd_with_more_negatives_than_images_is_a_one_line_error(reference, tmp_path, capsys):
    _, ref = reference
    teacher, crd = RECIPE.split("[stages.fitnet]")[0], "[stages.crd]" + RECIPE.split("[stages.crd]")[1]
    recipe = tmp_path / "bad.toml"
    recipe.write_text(teacher + crd.replace("nce_k = 64", "nce_k = 5000"))
    (tmp_path / "out").mkdir()
    shutil.copytree(ref / "teacher", tmp_path / "out" / "teacher")  # reused
    code = _run(recipe, tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "crd" in err and "nce_k" in err and "1438" in err
