"""Training in channels-last vs contiguous layout (``channels_last = true``).

1. One training step: the models of recipes/proto2proto.toml (timm
   ResNet-10t and ResNet-18 cut at stride 8, the ProtoPNet head on top), one
   Adam step of batch 32 at 56 px, both layouts interleaved in one process;
   CUDA with bf16 autocast when a GPU is available, else the CPU in fp32.
2. Through the trainer: a ProtoPNet ResNet-10t stage (digits, 56 px, batch
   32) run by ``kdt run`` with ``channels_last = false`` / ``true``,
   alternating, twice each; an observer plugin timestamps every epoch.

    python benchmarks/bench_channels_last.py [--steps 10] [--repeat 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdtoolkit.cli.commands import main as kdt_main
from kdtoolkit.plugin.contracts import Model
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, get_manager, set_manager

RECIPE = """
channels_last = {cl}
seed = 12
checkpoint_every = 0

[data]
dataset = "digits"
image_size = 56
batch_size = 32

[stages.student]
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 10, prototype_depth = 64 }}
[stages.student.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = 0.8 }}
separation = {{ weight = -0.08 }}
[[stages.student.phases]]
name = "joint"
epochs = {epochs}
groups = [
    {{ params = "backbone", lr = 1e-3 }},
    {{ params = "head.add_on", lr = 3e-3 }},
    {{ params = "head.prototypes", lr = 3e-3 }},
]
"""


class Clock:
    """Observer plugin: a timestamp at the end of every epoch."""

    def __init__(self):
        self.stamps: list[float] = []

    @hookimpl
    def kdt_after_epoch(self, stage, phase, epoch, metrics):
        self.stamps.append(time.perf_counter())


def trainer_epochs(epochs: int, device: str) -> dict[str, list[float]]:
    """Epoch times (2..E) of the stage, per layout, from alternating runs."""
    out: dict[str, list[float]] = {"false": [], "true": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, cl in enumerate(["false", "true", "false", "true"]):
            clock = Clock()
            set_manager(PluginManager(extra=[(clock, "bench_clock")]))
            recipe = Path(tmp) / f"r{i}.toml"
            recipe.write_text(RECIPE.format(cl=cl, epochs=epochs))
            code = kdt_main(["run", str(recipe), "--out", str(Path(tmp) / f"run{i}"), "--device", device, "-q"])
            set_manager(None)
            if code != 0:
                raise SystemExit(code)
            out[cl] += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return out


def build(backbone: str) -> Model:
    pm = get_manager()
    bb = pm.registry("backbone").get("timm").factory(model=backbone, out_index=2)
    head = (
        pm.registry("head").get("protopnet").factory(bb.out_channels, 10, prototypes_per_class=10, prototype_depth=64)
    )
    return Model(bb, head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the trainer-level runs (0: skip them)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    precision = " bf16" if dev.type == "cuda" else f" fp32, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {dev}{precision}, "
        f"batch {args.batch}, {args.size} px, {args.steps} steps x {args.repeat} repeats (median per step)"
    )
    print()
    print("| backbone | contiguous | channels-last | speedup |")
    print("|---|---|---|---|")
    for name in ("resnet10t", "resnet18"):
        torch.manual_seed(0)
        x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        models, opts = {}, {}
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            m = build(name).to(dev)
            if layout == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            models[layout], opts[layout] = m, torch.optim.Adam(m.parameters(), lr=1e-3)
        inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}

        def step(layout: str, opts: dict = opts, models: dict = models, inputs: dict = inputs, y=y) -> None:
            opts[layout].zero_grad(set_to_none=True)
            with amp():
                loss = torch.nn.functional.cross_entropy(models[layout](inputs[layout])["logits"].float(), y)
            loss.backward()
            opts[layout].step()

        times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for layout in times:  # warm-up
            for _ in range(2):
                step(layout)
        for _ in range(args.repeat):
            for layout in times:  # interleaved
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(layout)
                sync()
                times[layout].append((time.perf_counter() - t0) / args.steps)
        a, b = statistics.median(times["contiguous"]), statistics.median(times["channels_last"])
        print(f"| {name} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}× |")
    if args.epochs > 1:
        t = trainer_epochs(args.epochs, dev.type)
        a, b = statistics.median(t["false"]), statistics.median(t["true"])
        print()
        print("| through the trainer (ProtoPNet ResNet-10t stage, fp32) | contiguous | channels-last | speedup |")
        print("|---|---|---|---|")
        print(f"| epoch (median of {len(t['false'])} / {len(t['true'])}) | {a:.2f} s | {b:.2f} s | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
