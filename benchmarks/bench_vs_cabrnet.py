"""Benchmark: kdt's ProtoPNet training time per batch against CaBRNet 1.2's, same model and data.

The model: a ProtoPNet (10 prototypes per class, 10 classes, D = 64; add-on
1x1 conv, ReLU, 1x1 conv, Sigmoid; log similarity) on a randomly initialised
ResNet-18 cut after layer2 (stride 8), trained on scikit-learn's digits
written as an image folder of 32 px RGB PNGs (``train/`` and ``test/``, one
sub-folder per class; 1437 train images), batch 64, no augmentation, one
joint phase: Adam with groups backbone 1e-4, add-on 3e-3, prototypes 3e-3
(last layer frozen), losses cross-entropy + 0.8 cluster - 0.08 separation.

* **kdt**: ``python -m kdtoolkit run`` of a one-stage recipe reading the
  folder with the ``image_folder`` dataset (``resize = image_size = 32``, so
  images are only normalised, as CaBRNet's ``ToTensor`` + ``Normalize``).
* **CaBRNet**: ``python -m cabrnet.main train --device cpu`` with model,
  dataset and training YAML files written by this script (torchvision
  ``ImageFolder``; torchvision ``resnet18`` with ``layer: layer2``; one
  ``joint`` period; no projection during training; epilogue without pruning).

Method (the same for both tools): each tool is run as a whole subprocess for
``--short`` epochs and for ``--long`` epochs, and the wall time of each
subprocess is measured; the time per batch is the *marginal* time

    (T_long - T_short) / (batches_long - batches_short),

so interpreter start-up, model building, the final projection/evaluation and
checkpoint writing at the end cancel out. What each tool does once per
epoch (kdt: its resumable checkpoint; CaBRNet: its ``latest``/``best``
checkpoints and TensorBoard scalars) is part of the marginal time, as it is
part of training with that tool. With ``--repeats N`` the runs are
interleaved and the median of each T is used. The marginal CPU seconds
(user + system of the subprocess) per batch are printed too: they depend
less on other processes' load than wall time does. kdt's own in-loop time per
batch (``seconds`` of ``metrics.jsonl``, batches only) is printed for
reference but not used for the ratio.

Settings that differ (CaBRNet does not expose them): CaBRNet's ProtoPNet loss
always adds its last-layer L1 term (its coefficient is set to 0 here; the
last layer is frozen, as in kdt's phase); ``cabrnet.main`` turns on
``torch.use_deterministic_algorithms(warn_only=True)``; CaBRNet also builds
``*_raw`` copies of its datasets at start-up (start-up cancels out); the
weight initialisations and random seeds of the two tools differ (no effect
on the amount of work). Both tools use PyTorch's default number of threads
and ``num_workers = 0``.

CaBRNet is run by ``--cabrnet-python`` (for instance a virtual environment
holding it); by default by this interpreter. When ``import cabrnet`` fails
there, the script says so and exits with status 0.

Usage::

    python benchmarks/bench_vs_cabrnet.py [--cabrnet-python /path/to/python]
        [--short 1] [--long 3] [--repeats 1] [--max-train N] [--keep] [--kdt-set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BATCH = 64
IMAGE_SIZE = 32
MEAN = [0.305, 0.305, 0.305]  # statistics of the digits images scaled to [0, 1]
STD = [0.33, 0.33, 0.33]
SEED = 3
LR_BACKBONE, LR_ADD_ON, LR_PROTOTYPES = 1e-4, 3e-3, 3e-3
CLUSTER, SEPARATION = 0.8, -0.08

KDT_RECIPE = """
name = "bench_vs_cabrnet"
seed = {seed}

[data]
dataset = "image_folder"
root = "{root}"
train_dir = "train"
test_dir = "test"
image_size = {size}
resize = {size}
mean = {mean}
std = {std}
batch_size = {batch}
eval_batch_size = 256
augment = false
num_workers = 0

[evaluate]
metrics = [{{ name = "accuracy" }}]

[stages.p]
model.backbone = {{ name = "timm", model = "resnet18", out_index = 2 }}
model.head = {{ name = "protopnet", prototypes_per_class = 10, prototype_depth = 64 }}

[stages.p.losses]
cross_entropy = {{ weight = 1.0 }}
cluster = {{ weight = {cluster} }}
separation = {{ weight = {separation} }}

[[stages.p.phases]]
name = "joint"
epochs = {epochs}
groups = [
    {{ params = "backbone", lr = {lr_backbone} }},
    {{ params = "head.add_on", lr = {lr_add_on} }},
    {{ params = "head.prototypes", lr = {lr_prototypes} }},
]
"""


# --------------------------------------------------------------------------- data


def write_digits_folder(root: Path, max_train: int | None = None) -> tuple[int, int]:
    """Write scikit-learn's digits as 32 px RGB PNGs under root/{train,test}/<class>/; returns (n_train, n_test).

    ``max_train`` keeps only that many (shuffled, stratified-split) train images, for quick checks.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = bunch.target
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    if max_train is not None:
        idx_train = idx_train[:max_train]
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            im = Image.fromarray(images[i], mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            im.convert("RGB").save(root / split / str(labels[i]) / f"{i:04d}.png")
    return len(idx_train), len(idx_test)


# --------------------------------------------------------------------------- CaBRNet configs


def _image_folder_set(root: Path, split: str, batch: int, shuffle: bool) -> dict:
    return {
        "module": "torchvision.datasets",
        "name": "ImageFolder",
        "params": {
            "root": str(root / split),
            "transform": {
                "to_tensor": {"type": "ToTensor"},
                "normalize": {"type": "Normalize", "params": {"mean": MEAN, "std": STD}},
            },
        },
        "batch_size": batch,
        "shuffle": shuffle,
        "num_workers": 0,
    }


def write_cabrnet_configs(cfg_dir: Path, data_root: Path, epochs: int) -> None:
    """Model, dataset and training configuration of CaBRNet (JSON text, which YAML readers accept)."""
    cfg_dir.mkdir(parents=True, exist_ok=True)
    model = {
        "top_arch": {"module": "cabrnet.archs.protopnet.model", "name": "ProtoPNet"},
        "extractor": {
            "backbone": {"arch": "resnet18", "layer": "layer2", "weights": "None"},
            "add_on": {
                "init_mode": "PROTOPNET",
                "conv1": {"type": "Conv2d", "params": {"out_channels": 64, "kernel_size": 1}},
                "relu1": {"type": "ReLU"},
                "conv2": {"type": "Conv2d", "params": {"out_channels": 64, "kernel_size": 1}},
                "sigmoid1": {"type": "Sigmoid"},
            },
        },
        "similarity": {"name": "ProtoPNetSimilarity"},
        "classifier": {
            "module": "cabrnet.archs.protopnet.decision",
            "name": "ProtoPNetClassifier",
            "params": {"num_classes": 10, "num_features": 64, "num_proto_per_class": 10},
        },
    }
    dataset = {
        "train_set": _image_folder_set(data_root, "train", BATCH, True),
        "projection_set": _image_folder_set(data_root, "train", 256, False),
        "test_set": _image_folder_set(data_root, "test", 256, False),
    }
    training = {
        "param_groups": {
            "backbone": "extractor.convnet",
            "add_on": "extractor.add_on",
            "prototypes": "classifier.prototypes",
            "last_layer": "classifier.last_layer",
        },
        "optimizers": {
            "joint_optimizer": {
                "type": "Adam",
                "groups": {
                    "backbone": {"lr": LR_BACKBONE},
                    "add_on": {"lr": LR_ADD_ON},
                    "prototypes": {"lr": LR_PROTOTYPES},
                },
            },
        },
        "num_epochs": epochs,
        "periods": {
            "joint": {"epoch_range": [0, epochs - 1], "freeze": ["last_layer"], "optimizers": "joint_optimizer"},
        },
        "auxiliary_info": {
            "loss_coefficients": {"clustering": CLUSTER, "separability": SEPARATION, "regularization": 0.0},
            # no prototype projection (nor last-layer fine-tuning) during the timed epochs
            "projection_config": {"start_epoch": 10**9, "frequency": 1, "num_ft_epochs": 0},
        },
        # the epilogue projects once and evaluates; no pruning, no fine-tuning
        "epilogue": {"num_nearest_patches": 0, "num_fine_tuning_epochs": 0},
    }
    for name, cfg in (("model_arch.yml", model), ("dataset.yml", dataset), ("training.yml", training)):
        (cfg_dir / name).write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------- runs


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(cmd: list[str], what: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of a whole subprocess."""
    c0, t0 = _cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise SystemExit(f"{what} failed (status {proc.returncode}):\n{tail}")
    return elapsed, cpu


def run_kdt(
    tmp: Path, data_root: Path, epochs: int, tag: str, overrides: tuple[str, ...] = ()
) -> tuple[tuple[float, float], list[float]]:
    """(wall, CPU) seconds of a whole ``kdt run`` and the in-loop seconds of each epoch from metrics.jsonl."""
    recipe = tmp / f"kdt-{epochs}.toml"
    if not recipe.exists():
        recipe.write_text(
            KDT_RECIPE.format(
                seed=SEED,
                root=str(data_root),
                size=IMAGE_SIZE,
                mean=json.dumps(MEAN),
                std=json.dumps(STD),
                batch=BATCH,
                cluster=CLUSTER,
                separation=SEPARATION,
                epochs=epochs,
                lr_backbone=LR_BACKBONE,
                lr_add_on=LR_ADD_ON,
                lr_prototypes=LR_PROTOTYPES,
            )
        )
    out = tmp / f"kdt-run-{epochs}-{tag}"
    sets = [arg for o in overrides for arg in ("--set", o)]
    elapsed = _timed(
        [sys.executable, "-m", "kdtoolkit", "run", str(recipe), "--out", str(out), "-q", *sets],
        f"kdt run ({epochs} epochs)",
    )
    metrics = out / "p" / "metrics.jsonl"
    lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    return elapsed, [l["seconds"] for l in lines if l.get("phase") == "joint" and "seconds" in l]


def run_cabrnet(python: str, tmp: Path, data_root: Path, epochs: int, tag: str) -> tuple[float, float]:
    """(wall, CPU) seconds of a whole ``cabrnet train``."""
    cfg = tmp / f"cabrnet-cfg-{epochs}"
    if not cfg.exists():
        write_cabrnet_configs(cfg, data_root, epochs)
    out = tmp / f"cabrnet-run-{epochs}-{tag}"
    cmd = [
        python,
        "-m",
        "cabrnet.main",
        "train",
        "-m",
        str(cfg / "model_arch.yml"),
        "-d",
        str(cfg / "dataset.yml"),
        "-t",
        str(cfg / "training.yml"),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--seed",
        str(SEED),
        "--logger-level",
        "WARNING",
    ]
    return _timed(cmd, f"cabrnet train ({epochs} epochs)")


def torch_threads(python: str) -> str:
    proc = subprocess.run(
        [python, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else "?"


def cabrnet_available(python: str) -> bool:
    try:
        proc = subprocess.run([python, "-c", "import cabrnet"], capture_output=True, text=True)
    except OSError:
        return False
    return proc.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cabrnet-python", default=sys.executable, help="interpreter that can import cabrnet (default: this one)"
    )
    ap.add_argument("--short", type=int, default=1, help="epochs of the short runs")
    ap.add_argument("--long", type=int, default=3, help="epochs of the long runs")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved short/long runs per tool (median)")
    ap.add_argument(
        "--max-train", type=int, default=None, help="use only this many train images (quick checks; default: all 1437)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, configs, runs)")
    ap.add_argument(
        "--kdt-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for kdt's runs (repeatable), e.g. channels_last=true, data.num_workers=2",
    )
    args = ap.parse_args()
    if not 1 <= args.short < args.long:
        ap.error("need 1 <= --short < --long")
    if args.max_train is not None and args.max_train < 10:
        ap.error("--max-train must be at least 10")

    if not cabrnet_available(args.cabrnet_python):
        print(
            "cabrnet is not installed; pip install cabrnet to compare "
            f"(import cabrnet fails with {args.cabrnet_python}; another interpreter: --cabrnet-python)"
        )
        return

    tmp = Path(tempfile.mkdtemp(prefix="kdt-bench-cabrnet-"))
    try:
        data_root = tmp / "digits32"
        n_train, n_test = write_digits_folder(data_root, args.max_train)
        per_epoch = math.ceil(n_train / BATCH)
        load_before = os.getloadavg()
        times: dict[tuple[str, int], list[tuple[float, float]]] = {}
        in_loop: list[float] = []
        for r in range(args.repeats):
            for epochs in (args.short, args.long):
                t, secs = run_kdt(tmp, data_root, epochs, str(r), tuple(args.kdt_set))
                times.setdefault(("kdt", epochs), []).append(t)
                if epochs == args.long:
                    in_loop.extend(s / per_epoch for s in secs)
                t = run_cabrnet(args.cabrnet_python, tmp, data_root, epochs, str(r))
                times.setdefault(("CaBRNet", epochs), []).append(t)
        load_after = os.getloadavg()

        extra_batches = (args.long - args.short) * per_epoch
        print(
            f"# ProtoPNet (ResNet-18 to layer2, 100 prototypes, D 64), digits image folder {IMAGE_SIZE} px "
            f"({n_train} train / {n_test} test), batch {BATCH}, {per_epoch} batches per epoch"
        )
        print(
            f"# whole-run times, median of {args.repeats}; marginal s/batch = (T_long - T_short) / "
            f"{extra_batches} batches ({args.long} - {args.short} epochs)"
        )
        print(
            f"# {os.cpu_count()} CPUs; torch threads: kdt {torch_threads(sys.executable)}, "
            f"CaBRNet {torch_threads(args.cabrnet_python)}; load average (1 min) "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
        )
        print(f"{'tool':9s} {'short s':>9s} {'long s':>9s} {'marginal s/batch':>17s} {'CPU s/batch':>12s}")
        wall, cpu = {}, {}
        for tool in ("kdt", "CaBRNet"):
            short = [statistics.median(t[k] for t in times[(tool, args.short)]) for k in (0, 1)]
            long = [statistics.median(t[k] for t in times[(tool, args.long)]) for k in (0, 1)]
            wall[tool] = (long[0] - short[0]) / extra_batches
            cpu[tool] = (long[1] - short[1]) / extra_batches
            print(f"{tool:9s} {short[0]:9.2f} {long[0]:9.2f} {wall[tool]:17.4f} {cpu[tool]:12.4f}")
        if wall["kdt"] > 0 and wall["CaBRNet"] > 0:
            print(f"ratio kdt / CaBRNet (marginal wall s/batch): {wall['kdt'] / wall['CaBRNet']:.3f}")
        else:
            print(
                "ratio kdt / CaBRNet: undefined (a marginal time is not positive: the machine's load changed "
                "between the runs; rerun on a quiet machine, with --repeats or more --long epochs)"
            )
        if cpu["kdt"] > 0 and cpu["CaBRNet"] > 0:
            print(f"(ratio of the marginal CPU seconds per batch, user + system: {cpu['kdt'] / cpu['CaBRNet']:.3f})")
        if in_loop:
            print(
                f"(kdt in-loop s/batch from metrics.jsonl, median of the long runs' epochs: "
                f"{statistics.median(in_loop):.4f}; not used for the ratio)"
            )
        if max(load_before[0], load_after[0]) > 0.5:
            print(
                "# note: other processes were running (load average above 0.5); wall times include their interference"
            )
    finally:
        if args.keep:
            print(f"# files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
