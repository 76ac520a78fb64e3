"""Benchmark: the compute of the paper recipes (kdtoolkit/recipes/paper/), from measured per-image times.

For every backbone + head of the paper recipes (random weights, 224 px,
batch ``--batch``), two per-image times in this process:

- ``forward``: a forward pass under ``torch.no_grad`` (evaluation, push and
  projection passes, a frozen teacher's pass);
- ``train``: forward, cross-entropy, backward through backbone and head and
  an Adam step (the joint phases).

Then, for each paper recipe, the work of each stage counted from its
phases: a train phase that trains the backbone costs ``train`` per image,
one that does not (warm, freeze, last-layer phases: the backbone only runs
forward) ``forward``; a phase whose losses read the teacher adds the
teacher's ``forward``; every push/projection pass and the test evaluation
cost ``forward`` per image. The totals are printed in hours at the measured
CPU rates and, as an estimate, on a GPU that trains a ResNet-50 ProtoPNet at
``--gpu-r50-rate`` images/s, every other time scaled by its measured ratio
to that one (nothing is measured on a GPU; see docs/reproduce.md).

Usage::

    python benchmarks/bench_paper_steps.py [--batch 8] [--threads 1] [--gpu-r50-rate 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import torch  # noqa: E402

#: (train, test) images of the official splits.
SIZES = {"stanford_cars": (8144, 8041), "cub200": (5994, 5794)}
KD_LOSSES = {"global_explanation", "patch_prototype_correspondence", "tree_kd"}


def _model(backbone: dict, head: dict, num_classes: int) -> torch.nn.Module:
    from kdt_protopnet.head import ProtoPNetHead
    from kdt_prototree.head import ProtoTreeHead
    from kdt_timm.backbone import TimmBackbone
    from kdtoolkit.plugin.contracts import Model

    b = TimmBackbone(model=backbone["model"].split(".")[0], out_index=backbone["out_index"])
    params = {k: v for k, v in head.items() if k != "name"}
    h = (ProtoTreeHead if head["name"] == "prototree" else ProtoPNetHead)(b.out_channels, num_classes, **params)
    return Model(b, h)


def measure(model: torch.nn.Module, batch: int, repeats: int = 2) -> dict[str, float]:
    """Seconds per image of a no-grad forward pass and of a training step (best of ``repeats``)."""
    x = torch.randn(batch, 3, 224, 224)
    y = torch.zeros(batch, dtype=torch.long)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    out = {}
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        out["forward"] = min(_timed(lambda: model(x)) for _ in range(repeats)) / batch
    model.train()

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x)["logits"], y).backward()
        opt.step()

    step()
    out["train"] = min(_timed(step) for _ in range(repeats)) / batch
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stage_passes(
    stage: dict, teacher: dict | None, times: dict, key, n_train: int, n_test: int
) -> list[tuple[int, float]]:
    """The stage's passes over data: (images, CPU seconds per image at ``times``, keyed by ``key(stage)``)."""
    own = times[key(stage)]
    passes = [(n_test, own["forward"])]  # the test evaluation
    active = {loss["id"] for loss in stage["losses"] if loss["weight"] != 0}
    for phase in stage["phases"]:
        if phase.get("kind", "train") != "train":
            passes.append((n_train, own["forward"]))  # push / projection pass (prune reads no image)
            continue
        used = set(phase.get("losses") or active) & active
        if phase["epochs"] == 0 or not used:
            continue
        trains_backbone = any(
            g == "backbone" or g.startswith("backbone.")
            for group in phase["groups"]
            for g in _selectors(group["params"])
        )
        per_image = own["train"] if trains_backbone else own["forward"]
        if teacher is not None and used & KD_LOSSES:
            per_image += times[key(teacher)]["forward"]
        passes.append((phase["epochs"] * n_train, per_image))
    return passes


def _selectors(params) -> list[str]:
    return [params] if isinstance(params, str) else list(params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--gpu-r50-rate",
        type=float,
        default=1000.0,
        help="assumed GPU training images/s of the ResNet-50 ProtoPNet (not measured)",
    )
    ap.add_argument(
        "--loader-rate",
        type=float,
        default=1000.0,
        help="images/s the data loader delivers (a cap on every pass; not measured here)",
    )
    ap.add_argument("--times", help="reuse per-image times: 'model+head=forward_ms/train_ms,...' (skips measuring)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from kdtoolkit.recipe.loader import load_recipe

    with tempfile.NamedTemporaryFile(suffix=".pth") as weights:  # validation only checks that the file exists
        over = [f"stages.teacher.model.backbone.weights={weights.name}"]
        recipes = {
            p.stem: load_recipe(p, over if "prototree" in p.stem else [])
            for p in sorted((ROOT / "kdtoolkit" / "recipes" / "paper").glob("*.toml"))
        }

    def key(stage):
        return stage["model"]["backbone"]["model"].split(".")[0], stage["model"]["head"]["name"]

    times: dict = {}
    for item in filter(None, (args.times or "").split(",")):
        name, _, ms = item.partition("=")
        fwd, _, train = ms.partition("/")
        times[tuple(name.split("+"))] = {"forward": float(fwd) / 1000, "train": float(train) / 1000}
    for rec in recipes.values():
        for name in rec.order:
            stage = rec.stage(name)
            if key(stage) in times:
                continue
            classes = 196 if stage["data"]["dataset"] == "stanford_cars" else 200
            times[key(stage)] = measure(_model(stage["model"]["backbone"], stage["model"]["head"], classes), args.batch)
            t = times[key(stage)]
            print(
                f"{key(stage)[0]:>12} + {key(stage)[1]:<9}  forward {1000 * t['forward']:7.1f} ms/image   "
                f"train {1000 * t['train']:7.1f} ms/image   (CPU, {args.threads} thread(s), batch {args.batch})"
            )
    gpu_scale = times[("resnet50", "protopnet")]["train"] * args.gpu_r50_rate  # CPU seconds per GPU second
    print(
        f"\nGPU estimate: ResNet-50 ProtoPNet training at {args.gpu_r50_rate:.0f} images/s (assumed), every other "
        f"time scaled by its measured CPU ratio, no pass faster than {args.loader_rate:.0f} images/s (loader)\n"
    )
    for rec_name, rec in recipes.items():
        n_train, n_test = SIZES[rec.stage(rec.order[0])["data"]["dataset"]]
        gpu, cpu, images = {}, 0.0, 0
        for name in rec.order:
            stage = rec.stage(name)
            teacher = rec.stage(stage["teacher"]) if stage.get("teacher") else None
            passes = stage_passes(stage, teacher, times, key, n_train, n_test)
            gpu[name] = sum(n * max(t / gpu_scale, 1 / args.loader_rate) for n, t in passes)
            cpu += sum(n * t for n, t in passes)
            images += sum(n for n, _ in passes)
        print(
            f"{rec_name}: "
            + ", ".join(f"{n} {t / 60:.0f} min" for n, t in gpu.items())
            + f"; total {sum(gpu.values()) / 3600:.1f} GPU h (estimate), {images / 1e6:.1f} M images; "
            f"{cpu / 3600:.0f} h at the measured CPU rates"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
