"""Proto2Proto overheads, measured side by side in one run on the same machine.

1. Evaluation of a teacher and a student with all 8 thresholds (records,
   accuracy, AAP and AJS per τ, PMS) vs the two models' bare forward passes
   over the same data.
2. One Proto2Proto training step (student forward/backward, teacher forward
   under no_grad, ProtoPNet + global explanation + patch-prototype
   correspondence losses) vs a student-only ProtoPNet step plus a teacher
   forward in inference mode.

    python benchmarks/bench_proto2proto.py [--images 1024] [--size 56] [--steps 20]

Random-init models (ProtoPNet heads on timm ResNet-34 / ResNet-10t cut at
stride 8, as in recipes/proto2proto.toml); random images; CPU unless CUDA is
available.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdtoolkit.engine.metrics import Accuracy
from kdtoolkit.plugin.contracts import Model, Step
from kdtoolkit.plugin.manager import get_manager
from kdtoolkit.engine.evaluation import evaluate
from kdt_proto2proto.evaluation import AAP, AJS, PMS
from kdt_proto2proto.losses import GlobalExplanationLoss, PatchPrototypeCorrespondenceLoss
from kdt_protopnet.losses import ClusterLoss, LastLayerL1, SeparationLoss
from kdt_classic.losses import CrossEntropyLoss


def build(backbone: str, depth: int, classes: int, per_class: int) -> Model:
    pm = get_manager()
    bb = pm.registry("backbone").get("timm").factory(model=backbone, out_index=2)
    head = (
        pm.registry("head")
        .get("protopnet")
        .factory(bb.out_channels, classes, prototypes_per_class=per_class, prototype_depth=depth)
    )
    return Model(bb, head)


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    K, per_class, D = 10, 10, 128
    teacher = build("resnet34", D, K, per_class).to(dev).eval()
    student = build("resnet10t", D, K, per_class).to(dev)
    x = torch.rand(args.images, 3, args.size, args.size)
    y = torch.randint(0, K, (args.images,))
    data = Tensors(x, y)
    taus = [0.01, 0.1, 0.2, 0.45, 1.0, 3.0, 5.0, float("inf")]

    # 1. evaluation overhead --------------------------------------------------
    @torch.inference_mode()
    def bare():
        for m in (teacher, student):
            m.eval()
            for i in range(0, args.images, 256):
                m(x[i : i + 256].to(dev))

    def full():
        rt = evaluate(
            teacher, data, batch_size=256, device=dev, record_keys=("min_distances", "argmin"), meta={"stage": "t"}
        )
        rs = evaluate(
            student, data, batch_size=256, device=dev, record_keys=("min_distances", "argmin"), meta={"stage": "s"}
        )
        for recs, ref in ((rt, None), (rs, rt)):
            Accuracy()(recs)
            AAP(taus=taus)(recs)
            AJS(taus=taus)(recs, ref or recs)
        PMS()(rs, rt)

    bare()  # warm-up
    t_bare = timed(bare, args.repeat)
    t_full = timed(full, args.repeat)

    # 2. KD step overhead -------------------------------------------------------
    xb = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    yb = torch.randint(0, K, (args.batch,), device=dev)
    base_losses = [(1.0, CrossEntropyLoss()), (1.0, ClusterLoss()), (-0.08, SeparationLoss()), (1e-4, LastLayerL1())]
    kd_losses = base_losses + [(10.0, GlobalExplanationLoss()), (10.0, PatchPrototypeCorrespondenceLoss(tau=50.0))]
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def student_only_plus_teacher_forward():
        student.train()
        out = student(xb)
        step = Step(xb, yb, out, student)
        loss = sum(w * l(step) for w, l in base_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.inference_mode():
            teacher(xb)

    def kd_step():
        student.train()
        out = student(xb)
        with torch.no_grad():
            t_out = teacher(xb)
        step = Step(xb, yb, out, student, t_out, teacher)
        loss = sum(w * l(step) for w, l in kd_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        student_only_plus_teacher_forward()
        kd_step()
    a, b = [], []
    for _ in range(args.steps):  # interleaved, so drift affects both alike
        a.append(timed(student_only_plus_teacher_forward, 1))
        b.append(timed(kd_step, 1))
    t_base, t_kd = statistics.median(a), statistics.median(b)

    print(
        f"device: {dev}, torch threads: {torch.get_num_threads()}, images: {args.images} at {args.size} px, "
        f"P = {K * per_class}, D = {D}"
    )
    print("| measurement | baseline | kdtoolkit | overhead |")
    print("|---|---|---|---|")
    print(
        f"| evaluation, teacher + student, 8 τ + PMS | bare forwards {t_bare:.3f} s | {t_full:.3f} s | "
        f"{100 * (t_full / t_bare - 1):+.1f}% |"
    )
    print(
        f"| one training step, batch {args.batch} | student-only step + teacher inference {1000 * t_base:.1f} ms | "
        f"Proto2Proto step {1000 * t_kd:.1f} ms | {100 * (t_kd / t_base - 1):+.1f}% |"
    )
    print("command: python benchmarks/bench_proto2proto.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
