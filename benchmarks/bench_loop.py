"""Benchmark: kdt's training loop against a bare PyTorch loop on the same model and data.

The model: a ProtoPNet head (10 prototypes per class, D = 64) on a timm
ResNet-18 cut after layer 2, trained on the bundled digits at 32 px, batch
64, with cross-entropy, cluster (0.8) and separation (-0.08) losses and the
Adam groups of ProtoPNet's joint phase (backbone 1e-3, add-on 3e-3,
prototypes 3e-3). No augmentation, no evaluation work in the timed part.

* **kdt**: ``kdt run`` of a one-stage recipe (one warm epoch, then the joint
  epochs); the time per batch of each joint epoch is its ``seconds`` in
  ``metrics.jsonl`` over its batch count, so start-up, model building and
  evaluation are not counted.
* **bare**: the same model (built by the same factories with the same seed),
  the same loss components and optimiser groups, trained by a plain loop over
  the train split preloaded as one tensor: index, forward, losses, backward,
  step.

Both run in fresh interpreters, interleaved, ``--repeats`` times each; with
``--channels-last both`` each is also measured in channels-last layout.
Prints the median seconds per batch and the ratio kdt / bare.

Usage::

    python benchmarks/bench_loop.py [--epochs 3] [--repeats 3] [--channels-last off|on|both] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name = "bench_loop"
seed = 3
channels_last = {channels_last}

[data]
dataset = "digits"
image_size = 32
batch_size = 64
augment = false
num_workers = {workers}

[evaluate]
metrics = [{{ name = "accuracy" }}]

[stages.p]
model.backbone = {{ name = "timm", model = "resnet18", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 10, prototype_depth = 64 }}

[stages.p.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 0.8 }}
separation = {{ weight = -0.08 }}

[[stages.p.phases]]
name = "warm"
epochs = 1
groups = [{{ params = "head.add_on", lr = 3e-3 }}, {{ params = "head.prototypes", lr = 3e-3 }}]

[[stages.p.phases]]
name = "joint"
epochs = {epochs}
groups = [
    {{ params = "backbone", lr = 1e-3 }},
    {{ params = "head.add_on", lr = 3e-3 }},
    {{ params = "head.prototypes", lr = 3e-3 }},
]
"""

BARE = r"""
import json, math, sys, time
import torch
from kdtoolkit.plugin.contracts import Model, Step
from kdtoolkit.plugin.manager import get_manager

epochs, channels_last = int(sys.argv[1]), sys.argv[2] == "true"
pm = get_manager()
ds = pm.registry("dataset").get("digits").factory("train", False, image_size=32)
X = torch.stack([ds[i][0] for i in range(len(ds))])
Y = torch.tensor([ds[i][1] for i in range(len(ds))])
torch.manual_seed(3)
bb = pm.registry("backbone").get("timm").factory(model="resnet18", out_index=2)
head = pm.registry("head").get("protopnet").factory(bb.out_channels, 10, prototypes_per_class=10, prototype_depth=64)
model = Model(bb, head)
if channels_last:
    model = model.to(memory_format=torch.channels_last)
losses = [(1.0, pm.registry("loss").get("cross_entropy").factory()),
          (0.8, pm.registry("loss").get("cluster").factory()),
          (-0.08, pm.registry("loss").get("separation").factory())]
opt = torch.optim.Adam([
    {"params": list(model.backbone.parameters()), "lr": 1e-3},
    {"params": list(model.head.add_on.parameters()), "lr": 3e-3},
    {"params": [model.head.prototypes], "lr": 3e-3},
])
model.train()
per_batch = []
for epoch in range(epochs + 1):  # the first epoch warms up, as kdt's warm phase does
    order = torch.randperm(len(Y))
    nb = math.ceil(len(Y) / 64)
    t0 = time.perf_counter()
    for b in range(nb):
        idx = order[b * 64:(b + 1) * 64]
        x, y = X[idx], Y[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        step = Step(x, y, out, model)
        total = sum(w * fn(step) for w, fn in losses)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    if epoch > 0:
        per_batch.append((time.perf_counter() - t0) / nb)
print("PER_BATCH=" + json.dumps(per_batch))
"""


def run_kdt(tmp: Path, epochs: int, channels_last: bool, workers: int) -> list[float]:
    recipe = tmp / f"loop-{channels_last}-{workers}.toml"
    recipe.write_text(RECIPE.format(epochs=epochs, channels_last=str(channels_last).lower(), workers=workers))
    out = tmp / f"run-{time.time_ns()}"
    proc = subprocess.run(
        [sys.executable, "-m", "kdtoolkit", "run", str(recipe), "--out", str(out), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kdt run failed: {proc.stderr.strip()[-800:]}")
    lines = [json.loads(l) for l in (out / "p" / "metrics.jsonl").read_text().splitlines()]
    nb = -(-1437 // 64)
    return [l["seconds"] / nb for l in lines if l["phase"] == "joint"]


def run_bare(epochs: int, channels_last: bool) -> list[float]:
    proc = subprocess.run(
        [sys.executable, "-c", BARE, str(epochs), str(channels_last).lower()], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"bare loop failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.split("PER_BATCH=")[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="joint epochs timed per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels-last", choices=("off", "on", "both"), default="both")
    ap.add_argument("--workers", type=int, default=0, help="kdt's data.num_workers")
    args = ap.parse_args()
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    tmp = Path(tempfile.mkdtemp(prefix="kdt-bench-loop-"))
    res: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for cl in layouts:
            res.setdefault(("kdt", cl), []).extend(run_kdt(tmp, args.epochs, cl, args.workers))
            res.setdefault(("bare", cl), []).extend(run_bare(args.epochs, cl))
    print(
        f"# seconds per batch (batch 64), median of {args.repeats} x {args.epochs} epochs; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, kdt num_workers = {args.workers}"
    )
    print(f"{'layout':14s} {'bare s/batch':>13s} {'kdt s/batch':>12s} {'kdt / bare':>11s}")
    for cl in layouts:
        bare, kdt = statistics.median(res[("bare", cl)]), statistics.median(res[("kdt", cl)])
        print(f"{'channels-last' if cl else 'contiguous':14s} {bare:13.4f} {kdt:12.4f} {kdt / bare:11.3f}")


if __name__ == "__main__":
    main()
