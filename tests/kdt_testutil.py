"""Test helpers: tiny recipes that run in seconds on a 2-core CPU, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: 16 px digits, ResNet-10t cut at stride 8 (2x2 grid).
TINY_DATA = """
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 128
"""

TINY_CLASSIC = (
    TINY_DATA
    + """
[stages.teacher]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 1
limit_batches = 3
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]

[stages.kd]
teacher = "teacher"
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy", weight = 0.5 }, { name = "hinton_kd", weight = 0.5 }]
[[stages.kd.phases]]
epochs = 2
limit_batches = 3
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
"""
)

PROTO_STAGE = """
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 2, prototype_depth = 16 }}
[stages.{name}.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 0.8 }}
separation = {{ weight = -0.08 }}
l1_last_layer = {{ weight = 1e-4 }}
{extra_losses}
[[stages.{name}.phases]]
name = "{first}"
epochs = 1
limit_batches = 2
{first_losses}
groups = [{{ params = "head.add_on", lr = 3e-3 }}, {{ params = "head.prototypes", lr = 3e-3 }}]
[[stages.{name}.phases]]
name = "joint"
epochs = 1
limit_batches = 2
groups = [
    {{ params = "backbone", lr = 1e-3 }},
    {{ params = "head.add_on", lr = 3e-3 }},
    {{ params = "head.prototypes", lr = 3e-3 }},
]
[[stages.{name}.phases]]
name = "push"
kind = "push"
[[stages.{name}.phases]]
name = "last_layer"
epochs = 1
limit_batches = 2
losses = ["cross_entropy", "l1_last_layer"]
groups = [{{ params = "head.last_layer", lr = 1e-3 }}]
"""


def proto_recipe(ppc_weight: float = 10.0, global_weight: float = 10.0) -> str:
    """teacher (ProtoPNet), baseline (compare_to teacher) and kd (Proto2Proto)."""
    head = (
        TINY_DATA
        + """
[evaluate]
metrics = [{ name = "accuracy" }, { name = "aap" }, { name = "ajs" }, { name = "pms" }]
"""
    )
    teacher = "\n[stages.teacher]\n" + PROTO_STAGE.format(
        name="teacher", extra_losses="", first="warm", first_losses=""
    )
    baseline = '\n[stages.baseline]\ncompare_to = "teacher"\n' + PROTO_STAGE.format(
        name="baseline", extra_losses="", first="warm", first_losses=""
    )
    kd_losses = (
        f"global_explanation = {{ weight = {global_weight} }}\n"
        f"patch_prototype_correspondence = {{ weight = {ppc_weight}, tau = 8.0 }}\n"
    )
    kd = '\n[stages.kd]\nteacher = "teacher"\nmodel.init_from_teacher = ["head.last_layer"]\n' + PROTO_STAGE.format(
        name="kd",
        extra_losses=kd_losses,
        first="kd_warm",
        first_losses='losses = ["global_explanation", "patch_prototype_correspondence"]',
    )
    return head + teacher + baseline + kd


def run_kdt(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m kdtoolkit ARGS`` in a subprocess (as a user would run ``kdt``)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kdtoolkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )
