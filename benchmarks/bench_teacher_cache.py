"""Speedup of ``teacher_cache`` in a Proto2Proto stage, measured through the real trainer.

One ``kdt run`` (in-process) of a recipe with a ProtoPNet ResNet-18 teacher
(as ``recipes/proto2proto.toml``: 56 px digits, stride-8 cut, 7×7 grid,
D = 64, batch 32, ``data.augment = false``) and four identical Proto2Proto
ResNet-10t students, interleaved: ``off``, ``memory``, ``off``, ``memory``.
Each student runs the paper's two KD phases (``kd_warm``: the KD losses on
add-on and prototypes; ``joint``: the full loss on every parameter) and is
evaluated. An observer plugin timestamps every epoch and every stage.

Reported, side by side from the same run:

- per-epoch time of the joint phase (median over its epochs 2..E of both
  students of each kind; the first epoch is left out because it starts with
  the phase's setup);
- wall time of each whole student stage (build, teacher cache, both phases,
  evaluation): ``memory_1`` builds the cache, ``memory_2`` reuses it (as
  ablation stages sharing a teacher do);
- the time to build the cache (one teacher pass over the training set,
  timed separately with the same function the trainer calls).

    python benchmarks/bench_teacher_cache.py [--epochs 4] [--size 56] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdtoolkit.engine import teacher as teachercache
from kdtoolkit.cli.commands import main as kdt_main
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, get_manager, set_manager
from kdtoolkit.recipe.loader import load_recipe
from kdtoolkit.engine.data import batches, build_data
from kdtoolkit.foundation.device import autocast
from kdtoolkit.engine.models import build_model, load_model_file

RECIPE = """
name = "bench_teacher_cache"
seed = 9
checkpoint_every = 0

[data]
dataset = "digits"
image_size = {size}
batch_size = 32
eval_batch_size = 256
augment = false

[stages.teacher]
seed = 12
model.backbone = {{ name = "timm", model = "resnet18", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 10, prototype_depth = 64 }}
[stages.teacher.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 0.8 }}
separation = {{ weight = -0.08 }}
[[stages.teacher.phases]]
name = "joint"
epochs = 1
limit_batches = 5
groups = [
    {{ params = "backbone", lr = 1e-3 }},
    {{ params = "head.add_on", lr = 3e-3 }},
    {{ params = "head.prototypes", lr = 3e-3 }},
]

[stages.off_1]
teacher = "teacher"
teacher_cache = "off"
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 10, prototype_depth = 64 }}
model.init_from_teacher = ["head.last_layer"]
[stages.off_1.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 1.0 }}
separation = {{ weight = -0.08 }}
l1_last_layer = {{ weight = 1e-4 }}
global_explanation = {{ weight = 10.0 }}
patch_prototype_correspondence = {{ weight = 10.0, tau = 25.0 }}
[[stages.off_1.phases]]
name = "kd_warm"
epochs = 1
losses = ["global_explanation", "patch_prototype_correspondence"]
groups = [{{ params = "head.add_on", lr = 3e-3 }}, {{ params = "head.prototypes", lr = 3e-3 }}]
[[stages.off_1.phases]]
name = "joint"
epochs = {epochs}
groups = [
    {{ params = "backbone", lr = 1e-3 }},
    {{ params = "head.add_on", lr = 3e-3 }},
    {{ params = "head.prototypes", lr = 3e-3 }},
    {{ params = "head.last_layer", lr = 1e-4 }},
]

[stages.memory_1]
base = "off_1"
teacher_cache = "memory"

[stages.off_2]
base = "off_1"

[stages.memory_2]
base = "off_1"
teacher_cache = "memory"
"""


class Clock:
    """Observer plugin: a timestamp at the end of every epoch and every stage."""

    def __init__(self):
        self.epochs: list[tuple[str, str, int, float]] = []
        self.stages: list[tuple[str, float]] = []

    @hookimpl
    def kdt_after_epoch(self, stage, phase, epoch, metrics):
        self.epochs.append((stage, phase, epoch, time.perf_counter()))

    @hookimpl
    def kdt_after_stage(self, stage, result, stage_dir):
        self.stages.append((stage, time.perf_counter()))


def epoch_times(clock: Clock, stage: str, phase: str) -> list[float]:
    stamps = [t for s, p, _, t in clock.epochs if s == stage and p == phase]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def stage_times(clock: Clock) -> dict[str, float]:
    return {s: t - clock.stages[i - 1][1] for i, (s, t) in enumerate(clock.stages) if i > 0}


def cache_build_seconds(recipe_path: Path, out: Path, repeat: int = 3) -> tuple[float, str]:
    """The trainer's cache pass, timed alone: teacher forward over the training set."""
    pm = get_manager()
    r = load_recipe(recipe_path)
    st = r.stage("memory_1")
    data = build_data(st, pm)
    teacher = build_model(r.stage("teacher"), data.num_classes, pm)
    teacher.load_state_dict(load_model_file(out / "teacher" / "model.safetensors")[0])
    dev = torch.device("cpu")
    times, cache = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        tensors = teachercache.compute(
            teacher,
            batches(data.train, 256, shuffle=False, seed=0),
            keys={"features"},
            device=dev,
            autocast=lambda: autocast(dev, "fp32"),
        )
        times.append(time.perf_counter() - t0)
        cache = teachercache.TeacherCache(tensors, "bench")
    return statistics.median(times), teachercache.describe(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each student's joint phase")
    ap.add_argument("--size", type=int, default=56, help="image size (56: the 7x7 grid of recipes/proto2proto.toml)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = Clock()
    set_manager(PluginManager(extra=[(clock, "bench_clock")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        recipe = Path(tmp) / "bench.toml"
        recipe.write_text(RECIPE.format(size=args.size, epochs=args.epochs))
        t0 = time.perf_counter()
        code = kdt_main(["run", str(recipe), "--out", str(out), "--device", "cpu", "-q"])
        if code != 0:
            raise SystemExit(code)
        total = time.perf_counter() - t0
        build, what = cache_build_seconds(recipe, out)

    off = [t for s in ("off_1", "off_2") for t in epoch_times(clock, s, "joint")]
    mem = [t for s in ("memory_1", "memory_2") for t in epoch_times(clock, s, "joint")]
    stages = stage_times(clock)
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, {args.size} px, joint phase of {args.epochs} epochs, "
        f"whole run {total:.0f} s"
    )
    print(f"cache: {what}; building it (one teacher pass) takes {build:.2f} s")
    print()
    print("| measurement | teacher_cache = off | teacher_cache = memory | speedup |")
    print("|---|---|---|---|")
    print(
        f"| joint-phase epoch (median of {len(off)} / {len(mem)}) | {statistics.median(off):.2f} s | "
        f"{statistics.median(mem):.2f} s | **{statistics.median(off) / statistics.median(mem):.2f}×** |"
    )
    print(
        f"| whole student stage, cache built in it (off_1 vs memory_1) | {stages['off_1']:.1f} s | "
        f"{stages['memory_1']:.1f} s | **{stages['off_1'] / stages['memory_1']:.2f}×** |"
    )
    print(
        f"| whole student stage, cache reused from the stage before (off_2 vs memory_2) | {stages['off_2']:.1f} s | "
        f"{stages['memory_2']:.1f} s | **{stages['off_2'] / stages['memory_2']:.2f}×** |"
    )


if __name__ == "__main__":
    main()
