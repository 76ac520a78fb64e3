"""Helpers for the reliability tests (resume, faults, distributed).

``GATE_SOURCE`` is a throwaway kdt plugin, installed for subprocesses as a
module plus a ``*.dist-info`` folder on ``PYTHONPATH`` (how a third-party
plugin is found). It contributes:

- loss ``gate`` (always 0) and metric ``gate_metric`` (no result key), the
  phase kind ``gated_push`` (the Proto2Proto push phase) and observers of
  ``kdt_after_epoch``/``kdt_after_stage``: each can *hold* the run at a named
  point — it writes the file ``$KDT_GATE_MARK`` and waits until
  ``$KDT_GATE_MARK.go`` exists — so that a test can kill or interrupt a real
  ``kdt run`` at an exact point instead of after a delay. The points
  (``KDT_GATE``): ``loss:N`` (the N-th call of the loss in this process),
  ``metric:STAGE``, ``push:mid`` (after the first batch of the push pass),
  ``push:end`` (push done and its JSON written, not yet recorded),
  ``after_epoch:STAGE:EPOCH`` (metrics line written, epoch checkpoint not
  yet), ``after_stage:STAGE`` (``result.json`` written);
- ``KDT_GATE_RAISE=after_epoch`` makes the ``kdt_after_epoch`` observer raise;
  ``KDT_GATE_SIGINT=N`` makes the loss send SIGINT to its own process at its
  N-th call (Ctrl-C in the middle of a batch);
- backbone ``tinyconv``: two strided 3x3 convolutions with ReLU and no
  BatchNorm, so that results do not depend on how a batch is split
  (gradient accumulation, DDP);
- loss ``tap_regress``: a loss with parameters and state — a 1x1 conv
  connector, built from the shapes of a dry forward pass, regresses a student
  tap onto a teacher tap; buffers count optimiser steps (a per-step hook) and
  how often each training image was seen (per-sample indices).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GATE_MODULE = "kdt_gate_plugin"
GATE_SOURCE = '''
"""kdt test plugin: gates that hold a run at chosen points, and a BN-free backbone."""

import os
import signal
import time

import torch
from torch import nn

from kdtoolkit.plugin.hookspecs import hookimpl

_CALLS = {"loss": 0}


def _gate(point):
    if os.environ.get("KDT_GATE") != point:
        return
    mark = os.environ["KDT_GATE_MARK"]
    with open(mark, "w") as fh:
        fh.write(point)
    deadline = time.monotonic() + float(os.environ.get("KDT_GATE_WAIT", "300"))
    while not os.path.exists(mark + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)


class GateLoss:
    """Always zero; holds the run at its N-th call when KDT_GATE=loss:N."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __call__(self, step):
        _CALLS["loss"] += 1
        _gate(f"loss:{_CALLS['loss']}")
        if os.environ.get("KDT_GATE_SIGINT") == str(_CALLS["loss"]):
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed during this batch
        return step.outputs["logits"].float().sum() * 0.0


class GateMetric:
    """No result; holds the run while a stage is evaluated when KDT_GATE=metric:STAGE."""

    requires_reference = False
    requires_records = ("logits", "labels")

    def __call__(self, records, reference=None):
        _gate(f"metric:{records.meta.get('stage')}")
        return {}


class TinyConv(nn.Module):
    """Two strided 3x3 convolutions with ReLU, no BatchNorm (stride 4).

    :param channels: channels of the first convolution (the second has twice as many).
    """

    def __init__(self, *, channels: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(channels, 2 * channels, 3, 2, 1), nn.ReLU())
        self.out_channels = 2 * channels
        self.reduction = 4

    def forward(self, x):
        return self.body(x)


def _gated_push():
    from kdt_protopnet.push import PushPhase

    class GatedPush(PushPhase):
        """The push phase, with gates push:mid and push:end."""

        def run(self, ctx):
            inner = ctx.loader

            def loader(*args, **kwargs):
                for i, batch in enumerate(inner(*args, **kwargs)):
                    if i == 1:
                        _gate("push:mid")
                    yield batch

            ctx.loader = loader
            out = super().run(ctx)
            _gate("push:end")
            return out

    return GatedPush


class TapRegress(nn.Module):
    """Regress a student tap onto a teacher tap through a 1x1 conv connector.

    :param student_tap: the student tap.
    :param teacher_tap: the teacher tap.
    """

    requires_teacher = True
    requires_teacher_outputs = ()
    requires_taps = staticmethod(lambda p: (p["student_tap"],))
    requires_teacher_taps = staticmethod(lambda p: (p["teacher_tap"],))
    requires_indices = True

    def __init__(self, *, student_tap: str = "s", teacher_tap: str = "t"):
        super().__init__()
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.connector = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def setup(self, probe):
        cs = probe.features[self.student_tap].shape[1]
        ct = probe.teacher_features[self.teacher_tap].shape[1]
        self.connector = nn.Conv2d(cs, ct, 1)
        self.register_buffer("seen", torch.zeros(probe.num_train))

    def forward(self, step):
        s = self.connector(step.features[self.student_tap].float())
        t = step.teacher_features[self.teacher_tap].float()
        if s.shape[-2:] != t.shape[-2:]:
            s = nn.functional.adaptive_avg_pool2d(s, t.shape[-2:])
        with torch.no_grad():
            self.seen[step.indices] += 1
        return ((s - t) ** 2).mean()

    def on_optimizer_step(self, state):
        self.steps += 1


@hookimpl
def kdt_register_losses(registry):
    registry.add("gate", GateLoss)
    registry.add("tap_regress", TapRegress)


@hookimpl
def kdt_register_metrics(registry):
    registry.add("gate_metric", GateMetric)


@hookimpl
def kdt_register_backbones(registry):
    registry.add("tinyconv", TinyConv)


@hookimpl
def kdt_register_phases(registry):
    registry.add("gated_push", _gated_push())


@hookimpl
def kdt_after_epoch(stage, phase, epoch, metrics):
    _gate(f"after_epoch:{stage}:{epoch}")
    if os.environ.get("KDT_GATE_RAISE") == "after_epoch":
        raise RuntimeError(f"the gate plugin refuses epoch {epoch} of stage {stage}")


@hookimpl
def kdt_after_stage(stage, result, stage_dir):
    _gate(f"after_stage:{stage}")
'''


def make_gate_plugin(root: Path) -> Path:
    """Install the gate plugin under ``root`` (a folder to put on ``PYTHONPATH``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{GATE_MODULE}.py").write_text(textwrap.dedent(GATE_SOURCE))
    info = root / f"{GATE_MODULE}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {GATE_MODULE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdt]\ngate = {GATE_MODULE}\n")
    return root


def load_gate_module(root: Path):
    """The gate plugin as a module object, for in-process ``PluginManager(extra=...)``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{GATE_MODULE}_inprocess", root / f"{GATE_MODULE}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plugin_env(plugin_root: Path, **extra: str) -> dict[str, str]:
    """Environment of a ``kdt`` subprocess that discovers the gate plugin."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KDT_DISABLE_PLUGIN_AUTOLOAD", "KDT_BLOCK_PLUGINS") and not k.startswith("KDT_GATE")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def kdt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdtoolkit", *args]


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m kdtoolkit ARGS`` to completion."""
    return subprocess.run(kdt_cmd(*args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        kdt_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    """Poll ``condition()`` until true; fail (with the process's output) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"kdt ended (code {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"timed out waiting for {what}:\n{out}\n{err}")
        time.sleep(0.01)


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL, as a crash or an out-of-memory kill would end the run."""
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def gated(args: list[str], env: dict[str, str], point: str, mark: Path) -> subprocess.Popen:
    """Start ``kdt`` held at gate ``point``; returns once it is held there."""
    for f in (mark, Path(f"{mark}.go")):
        f.unlink(missing_ok=True)
    proc = start(args, {**env, "KDT_GATE": point, "KDT_GATE_MARK": str(mark)})
    wait_for(proc, mark.exists, f"gate {point}")
    return proc


def assert_same_weights(a: Path, b: Path, stages: list[str]) -> None:
    """Every tensor of every stage's ``model.safetensors`` is bit-identical."""
    for stage in stages:
        ta = load_file(str(a / stage / "model.safetensors"))
        tb = load_file(str(b / stage / "model.safetensors"))
        assert ta.keys() == tb.keys(), stage
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{stage}: {k} differs"


def metrics_lines(run_dir: Path, stage: str) -> list[dict]:
    """The stage's ``metrics.jsonl`` lines without their timing keys (which differ between runs)."""
    from kdtoolkit.engine.loop import TIMING_KEYS

    lines = [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if "epoch" in line:  # a train epoch (a plugin phase's line has no timing)
            assert all(isinstance(line[k], (int, float)) and line[k] >= 0 for k in TIMING_KEYS), line
        for k in TIMING_KEYS:
            line.pop(k, None)
    return lines


def one_line_error(proc) -> str:
    """The single ``kdt: error:`` line of a failed command (and no traceback)."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdt: error: "), proc.stderr
    return lines[0]
