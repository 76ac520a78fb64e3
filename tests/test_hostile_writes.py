"""Hostile writes: a full disk at every writer, a writer killed mid-figure, stale temporary files.

Every file kdtoolkit writes goes through one writer, :func:`kdtoolkit.foundation.io._write_fd`
(called by :func:`kdtoolkit.foundation.io.atomic_write_bytes` and
:func:`kdtoolkit.foundation.io.append_line`). The fault-injection test first counts the
writes of a clean two-stage run (a ProtoPNet teacher with a push phase, a KD
student) and checks that every file of the run directory came through that
writer; then, for each write N in turn, it runs the same recipe with the N-th
write failing halfway with ``ENOSPC`` (a disk filling up) and requires one
``kdt: error:`` line naming the file, exit code 2, the earlier stages'
files unchanged, no file corrupt and no temporary file left; the same command
run again must give a run identical, tensor by tensor, to the clean one. A new
writer is covered without changing this file, and the source check below
refuses a writer that bypasses :mod:`kdtoolkit.foundation.io`.

Where the test may mount a small tmpfs (root in a container), a real full disk
and a real read-only file system are also tried. Everything runs in-process
(``kdtoolkit.cli.commands.main``) on the ``tinyconv`` backbone of ``kdt_faultutil``,
except the writer killed mid-figure (a subprocess, SIGKILLed at a point it
reports, not after a delay).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdt_faultutil import ROOT, load_gate_module, make_gate_plugin, metrics_lines
from kdtoolkit.foundation import io as kio
from kdtoolkit.foundation.checkpoint import load_checkpoint
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, set_manager

STAGES = ["teacher", "kd"]

RECIPE = """
[data]
dataset = "digits"
image_size = 8
batch_size = 32
eval_batch_size = 512

[stages.teacher]
model.backbone = { name = "tinyconv" }
model.head = { name = "protopnet", prototypes_per_class = 1, prototype_depth = 8 }
losses = [{ name = "cross_entropy" }, { name = "cluster", weight = 0.8 }]
[[stages.teacher.phases]]
epochs = 2
limit_batches = 2
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]
[[stages.teacher.phases]]
name = "push"
kind = "push"

[stages.kd]
teacher = "teacher"
model.backbone = { name = "tinyconv" }
model.head = { name = "protopnet", prototypes_per_class = 1, prototype_depth = 8 }
losses = [{ name = "cross_entropy" }, { name = "hinton_kd" }]
[[stages.kd.phases]]
epochs = 1
limit_batches = 2
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]
"""


def _compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare_runs = _compare_runs()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread: these tiny runs are several times faster so on a busy 2-core machine (every
    run of this module, the uninterrupted one included, computes the same way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """The gate plugin module (its ``tinyconv`` backbone), in-process."""
    return load_gate_module(make_gate_plugin(tmp_path_factory.mktemp("hostile") / "site"))


@pytest.fixture
def plugins(gate):
    """Use the gate plugin (and ``extra`` plugins) in-process; restores the default manager after."""

    def use(*extra):
        set_manager(PluginManager(extra=[(gate, "gate"), *extra]))

    use()
    yield use
    set_manager(None)


def _main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdt: error: "), err
    return lines[0]


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _record_writes(monkeypatch, under: Path) -> list[str]:
    """Record the target of every write into the folder ``under`` from now on (the writes still
    happen; those elsewhere, e.g. into the per-user caches, are not counted)."""
    writes: list[str] = []
    real = kio._write_fd

    def recording(fd, data, path):
        if Path(path).is_relative_to(under):
            writes.append(str(path))
        real(fd, data, path)

    monkeypatch.setattr(kio, "_write_fd", recording)
    return writes


def _fail_write(monkeypatch, n: int, under: Path, err: int = errno.ENOSPC) -> None:
    """The ``n``-th write into the folder ``under`` from now on writes half its data, then fails
    with ``err`` (as a disk filling up does); every other write goes through."""
    real, count = kio._write_fd, [0]

    def failing(fd, data, path):
        count[0] += Path(path).is_relative_to(under)
        if count[0] == n and Path(path).is_relative_to(under):
            view = memoryview(data).cast("B")
            real(fd, view[: len(view) // 2], path)
            raise OSError(err, os.strerror(err))
        real(fd, data, path)

    monkeypatch.setattr(kio, "_write_fd", failing)


def _assert_nothing_corrupt(out: Path) -> None:
    """Every file left is whole: safetensors pass their checksum, JSON parses, log lines parse, PNGs decode."""
    from PIL import Image

    for p in out.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".safetensors":
            kio.read_safetensors(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            assert p.read_text().endswith("\n") or not p.read_text(), p
            [json.loads(l) for l in p.read_text().splitlines()]
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()


def _assert_same_stage(clean: Path, out: Path, stage: str) -> None:
    problems = []
    for fname in ("model.safetensors", "records.safetensors"):
        problems += compare_runs.compare_tensors(clean / stage / fname, out / stage / fname)
    problems += compare_runs.compare_results(clean / stage / "result.json", out / stage / "result.json")
    assert not problems, problems
    assert metrics_lines(clean, stage) == metrics_lines(out, stage)


def _assert_identical_runs(clean: Path, out: Path) -> None:
    assert not compare_runs.compare(clean, out)
    for stage in STAGES:
        _assert_same_stage(clean, out, stage)
    push = "teacher/push-push.json"
    assert json.loads((clean / push).read_text()) == json.loads((out / push).read_text())
    assert _files(clean) == _files(out)


@pytest.fixture(scope="module")
def clean(gate, tmp_path_factory):
    """The uninterrupted run: (recipe, run directory, the target of every write in order)."""
    d = tmp_path_factory.mktemp("clean")
    recipe = d / "r.toml"
    recipe.write_text(RECIPE)
    out = d / "run"
    mp = pytest.MonkeyPatch()
    set_manager(PluginManager(extra=[(gate, "gate")]))
    try:
        writes = _record_writes(mp, out)
        assert main(["run", str(recipe), "--out", str(out), "-q"]) == 0
    finally:
        mp.undo()
        set_manager(None)
    return recipe, out, writes


def _quick_training_curves(monkeypatch, png: bytes) -> None:
    """``training.png`` written (through the same writer) from ready bytes instead of drawn: drawing
    it takes most of a tiny run's time, and the runs that use this test other writers."""
    import kdtoolkit.results.report

    def write(out, stages, results=None):
        kio.atomic_write_bytes(Path(out) / "training.png", png)
        return Path(out) / "training.png"

    monkeypatch.setattr(kdtoolkit.results.report, "training_curves", write)


# --------------------------------------------------------------------------- every writer


def test_every_file_of_a_run_is_written_through_the_one_atomic_writer(clean):
    _, out, writes = clean
    written = {str(Path(w).relative_to(out)) for w in writes}
    assert _files(out) <= written  # nothing of the run bypassed the writer
    assert written - _files(out) == {
        "teacher/checkpoint.safetensors",
        "kd/checkpoint.safetensors",
    }  # removed at the end
    for name in ("training.png", "teacher/prototypes-push.png", "teacher/metrics.jsonl", "kd/checkpoint.safetensors"):
        assert str(out / name) in writes  # figures and the appended log included
    assert not _temps(out)


def test_a_full_disk_at_each_writer_is_one_line_exit_2_and_the_rerun_is_identical(
    clean, plugins, capsys, monkeypatch, tmp_path
):
    recipe, reference, writes = clean
    assert len(writes) >= 20
    png = (reference / "training.png").read_bytes()
    for n, target in enumerate(writes, start=1):
        out = tmp_path / f"write{n}"
        where = f"write {n} of {len(writes)} ({Path(target).relative_to(reference)})"
        if Path(target).name != "training.png":  # the figure is drawn where its own write fails
            _quick_training_curves(monkeypatch, png)
        _fail_write(monkeypatch, n, out)
        code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
        monkeypatch.undo()
        assert code == 2, where
        line = _line(err)
        path = out / Path(target).relative_to(reference)
        assert line.startswith(f"kdt: error: {path}: no space left on device; nothing finished was lost"), (where, line)
        assert "free some space, then run the same command again to resume" in line, where
        assert not _temps(out), where
        _assert_nothing_corrupt(out)
        for stage in STAGES:  # stages finished before the full disk are untouched
            if writes.index(str(reference / stage / "result.json")) < n - 1:
                _assert_same_stage(reference, out, stage)
        _quick_training_curves(monkeypatch, png)
        code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
        monkeypatch.undo()
        assert code == 0, (where, err)
        _assert_identical_runs(reference, out)
        assert not _temps(out), where


@pytest.mark.parametrize(
    "err, words",
    [
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.ENAMETOOLONG, "file name too long"),
        (errno.EFBIG, "file too large"),
    ],
)
def test_other_resource_errors_name_the_file_and_the_remedy(clean, plugins, capsys, monkeypatch, tmp_path, err, words):
    recipe, reference, writes = clean
    n = writes.index(str(reference / "kd" / "checkpoint.safetensors")) + 1
    out = tmp_path / "run"
    _fail_write(monkeypatch, n, out, err)
    code, stderr = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    monkeypatch.undo()
    assert code == 2
    line = _line(stderr)
    assert line.startswith(f"kdt: error: {out / 'kd' / 'checkpoint.safetensors'}: {words}")
    assert "; nothing finished was lost" in line and "then run the same command again to resume" in line
    assert (out / "teacher" / "result.json").is_file() and not _temps(out)


def test_a_full_disk_in_kdt_metrics_is_one_line_and_keeps_the_earlier_files(
    clean, plugins, capsys, monkeypatch, tmp_path
):
    _, reference, _ = clean
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {f: (run / f).read_bytes() for f in _files(run)}
    report = tmp_path / "metrics.json"
    writes = _record_writes(monkeypatch, tmp_path)
    code, _ = _main(capsys, "metrics", str(run), "--pms", "--no-figures", "--json", str(report))
    monkeypatch.undo()
    assert code == 0 and len(writes) >= 2
    good = {w: Path(w).read_bytes() for w in writes}
    for n, target in enumerate(writes, start=1):
        _fail_write(monkeypatch, n, tmp_path)
        code, err = _main(capsys, "metrics", str(run), "--pms", "--no-figures", "--json", str(report))
        monkeypatch.undo()
        assert code == 2 and f"kdt: error: {target}: no space left on device" in _line(err)
        assert Path(target).read_bytes() == good[target]  # the previous version, whole
        assert not _temps(run) and not _temps(tmp_path)
    assert all((run / f).read_bytes() == b for f, b in before.items())


def test_a_file_name_too_long_is_one_line_naming_it(clean, plugins, capsys, tmp_path):
    _, reference, _ = clean
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    target = tmp_path / ("m" * 300 + ".json")
    code, err = _main(capsys, "metrics", str(run), "--json", str(target))
    assert code == 2
    assert _line(err).startswith(f"kdt: error: {target}: file name too long; nothing finished was lost")


# --------------------------------------------------------------------------- out of memory


class _RunsOutOfMemory:
    """A throwaway plugin whose loss ``oom`` raises ``error`` at its ``at``-th call."""

    def __init__(self, at: int, error: type[BaseException]):
        self.at, self.error, self.calls = at, error, 0

    @hookimpl
    def kdt_register_losses(self, registry):
        outer = self

        class Oom:
            """Zero, until it runs out of memory."""

            requires_teacher = False
            requires_outputs = ("logits",)

            def __call__(self, step):
                outer.calls += 1
                if outer.calls == outer.at:
                    raise outer.error("tried to allocate 1.00 TiB")
                return step.outputs["logits"].float().mean() * 0.0

        registry.add("oom", Oom)


@pytest.mark.parametrize(
    "error, words", [(MemoryError, "out of memory (MemoryError)"), (torch.OutOfMemoryError, "out of GPU memory")]
)
def test_running_out_of_memory_is_one_line_exit_2_and_the_run_resumes(
    plugins, capsys, monkeypatch, tmp_path, error, words
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        RECIPE.replace(
            'losses = [{ name = "cross_entropy" }, { name = "hinton_kd" }]',
            'losses = [{ name = "cross_entropy" }, { name = "hinton_kd" }, { name = "oom" }]',
        )
    )
    out = tmp_path / "run"
    plugins((_RunsOutOfMemory(at=3, error=error), "oom"))  # kd, epoch 2, batch 1
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q", "--set", "stages.kd.phases[0].epochs=2")
    assert code == 2
    line = _line(err)
    assert line.startswith(f"kdt: error: {words}; nothing finished was lost") and "run the same command again" in line
    ck = load_checkpoint(out / "kd" / "checkpoint.safetensors")
    assert (ck.phase, ck.epoch) == (0, 1)  # after kd's epoch 1
    plugins((_RunsOutOfMemory(at=0, error=error), "oom"))
    _quick_training_curves(monkeypatch, b"not drawn")
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q", "--set", "stages.kd.phases[0].epochs=2")
    assert code == 0, err


def test_other_os_errors_are_not_reported_as_resource_errors():
    assert kio.resource_error_message(OSError(errno.EIO, "Input/output error")) is None
    assert kio.resource_error_message(PermissionError(errno.EACCES, "Permission denied")) is None
    assert kio.resource_error_message(RuntimeError("a bug")) is None


# --------------------------------------------------------------------------- a writer killed mid-figure

KILLED_WRITER = textwrap.dedent("""
    import os, sys, threading
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from kdtoolkit.foundation import io

    target, mark = sys.argv[1], sys.argv[2]
    real = io._write_fd

    def half_then_hang(fd, data, path):
        view = memoryview(data).cast("B")
        real(fd, view[: len(view) // 2], path)
        os.fsync(fd)
        with open(mark, "w") as fh:
            fh.write("half written")
        threading.Event().wait()  # held here until the test kills the process

    io._write_fd = half_then_hang
    fig = plt.figure(figsize=(3, 2))
    fig.text(0.1, 0.5, "the new figure")
    io.atomic_savefig(fig, target, dpi=80)
""")


def _png(path: Path, text: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(3, 2))
    fig.text(0.1, 0.5, text)
    kio.atomic_savefig(fig, path, dpi=80)
    plt.close(fig)
    return path.read_bytes()


def test_a_writer_killed_mid_figure_leaves_the_old_figure_and_the_next_write_removes_its_temp(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    target, mark = folder / "training.png", tmp_path / "mark"
    old = _png(target, "the old figure")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(mark)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the writer ended ({proc.returncode}) before its write:\n{proc.communicate()}")
            assert time.monotonic() < deadline, "the writer never reached its write"
            time.sleep(0.02)
        temps = _temps(folder)
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # half of the new figure, beside the old one
        assert f".kdt{proc.pid}-" in temps[0].name
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old  # the old figure, whole
    from PIL import Image

    with Image.open(target) as im:
        im.load()
    # the next process writing into the folder removes the dead writer's temporary file
    monkeypatch.setattr(kio, "_SWEPT", set())
    new = _png(target, "a newer figure")
    assert new != old and target.read_bytes() == new
    assert not _temps(folder)


# --------------------------------------------------------------------------- defect 12: stale temporary files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: no such process any more
    return proc.pid


def _temp(folder: Path, name: str, pid: int, tag: str, age: float = 0.0) -> Path:
    p = folder / f".{name}.kdt{pid}-{kio._HOST}-{tag}.tmp"
    p.write_bytes(b"half a file")
    if age:
        os.utime(p, (time.time() - age, time.time() - age))
    return p


def test_stale_temps_of_dead_writers_are_removed_by_the_next_command_and_live_ones_kept(
    clean, plugins, capsys, monkeypatch, tmp_path
):
    _, reference, _ = clean
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        kd = run / "kd"
        name = "pms_matching_vs_teacher.json"
        # left by a killed kdt metrics (defect 12), and by a concurrent one still writing
        dead = _temp(kd, name, _dead_pid(), "deadxxxx")
        running = _temp(kd, name, live.pid, "livexxxx")
        other_host = kd / f".{name}.kdt{_dead_pid()}-{'0' * 6 if kio._HOST != '0' * 6 else '1' * 6}-hostxxxx.tmp"
        other_host.write_bytes(b"another machine's writer")
        monkeypatch.setattr(kio, "_SWEPT", set())  # as in a new process
        code, err = _main(capsys, "metrics", str(run), "--pms", "--no-figures")
        assert code == 0, err
        assert (kd / name).is_file()
        assert not dead.exists() and running.exists() and other_host.exists()
        # kdt run (every stage reused) cleans the run directory and every stage directory
        dead_kd = _temp(kd, "model.safetensors", _dead_pid(), "deadyyyy")
        dead_top = _temp(run, "results.json", _dead_pid(), "deadzzzz")
        old_other_host = kd / f".{name}.kdt1-{'0' * 6 if kio._HOST != '0' * 6 else '1' * 6}-hostyyyy.tmp"
        old_other_host.write_bytes(b"")
        os.utime(old_other_host, (time.time() - 2 * kio.STALE_TEMP_SECONDS,) * 2)
        unmarked_old = kd / f".{name}.abcd1234.tmp"  # from an earlier kdtoolkit version: no PID in the name
        unmarked_new = kd / f".{name}.efgh5678.tmp"
        for p in (unmarked_old, unmarked_new):
            p.write_bytes(b"")
        os.utime(unmarked_old, (time.time() - 2 * kio.STALE_TEMP_SECONDS,) * 2)
        monkeypatch.setattr(kio, "_SWEPT", set())
        code, err = _main(capsys, "run", str(recipe), "--out", str(run), "-q")
        assert code == 0, err
        assert not dead_kd.exists() and not dead_top.exists() and not old_other_host.exists()
        assert not unmarked_old.exists() and unmarked_new.exists()
        assert running.exists() and other_host.exists()
    finally:
        live.kill()
        live.wait()
    assert kio.remove_stale_temps(kd) == [running]  # its writer is gone now


def test_temp_names_stay_under_the_file_name_limit(tmp_path):
    target = tmp_path / ("n" * 220 + ".json")
    kio.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and not _temps(tmp_path)


def test_an_append_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    kio.append_line(log, json.dumps({"epoch": 1}))
    before = log.read_bytes()
    _fail_write(monkeypatch, 1, tmp_path)
    with pytest.raises(OSError) as info:
        kio.append_line(log, json.dumps({"epoch": 2, "padding": "x" * 1000}))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(log)
    assert log.read_bytes() == before


# --------------------------------------------------------------------------- no writer bypasses kdtoolkit.foundation.io

#: Writes allowed outside kdtoolkit/foundation/io.py: (file, text of the line).
ALLOWED = {
    ("plugins/kdt_data/prepare.py", 'probe.write_bytes(b"")'),  # an empty probe file, removed at once
    ("kdtoolkit/use/export.py", "torch.jit.save(traced, buf, _extra_files=extra)"),  # into memory
    ("kdtoolkit/use/export.py", "save(program, buf, extra_files=extra)"),  # into memory
    # kdt run's writability probe: an empty file, removed at once
    (
        "kdtoolkit/engine/preflight.py",
        'fd, probe = tempfile.mkstemp(prefix=".kdt-write-probe.", suffix=".tmp", dir=out)',
    ),
    # open_regular_file: a file opened for reading ("rb"), never written
    ("kdtoolkit/foundation/limits.py", 'return os.fdopen(fd, "rb")'),
}
WRITE_CALLS = re.compile(
    r"\.savefig\(|\.write_text\(|\.write_bytes\(|json\.dump\(|torch\.save\(|np\.save[z]?\(|"
    r"\bsave\(program|torch\.jit\.save\(|\.to_csv\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|"
    r"\.open\([\"'][wax]|os\.fdopen\(|mkstemp\(|os\.replace\(|os\.rename\("
)


def test_no_writer_bypasses_the_atomic_helpers():
    found = []
    for base in ("kdtoolkit", "plugins"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in ("kdtoolkit/foundation/io.py",):
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                if WRITE_CALLS.search(line) and (rel, line.strip()) not in ALLOWED:
                    found.append(f"{rel}: {line.strip()}")
    assert not found, "write through kdtoolkit.foundation.io (atomic_write_bytes, atomic_savefig, ...):\n" + "\n".join(
        found
    )


# --------------------------------------------------------------------------- a real full disk (tmpfs)


class _FillsTheDisk:
    """A throwaway plugin: after epoch 1 of stage ``kd`` it fills (``full``) or remounts read-only
    (``readonly``) the tmpfs at ``mount``, so that the epoch's checkpoint meets the real error."""

    def __init__(self, mount: Path, how: str):
        self.mount, self.how = mount, how

    @hookimpl
    def kdt_after_epoch(self, stage, phase, epoch, metrics):
        if (stage, epoch) != ("kd", 1):
            return
        if self.how == "readonly":
            subprocess.run(["mount", "-o", "remount,ro", str(self.mount)], check=True)
            return
        chunk = 1 << 20
        with open(self.mount / "filler", "ab", buffering=0) as fh:  # unbuffered: each write fails or not
            while chunk:
                try:
                    fh.write(b"\0" * chunk)
                    fh.flush()
                except OSError:
                    chunk //= 2


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("how, words", [("full", "no space left on device"), ("readonly", "read-only file system")])
def test_a_real_full_or_read_only_disk_mid_run(clean, plugins, capsys, monkeypatch, tmpfs, how, words):
    recipe, reference, _ = clean
    out = tmpfs / "run"
    plugins((_FillsTheDisk(tmpfs, how), "fill"))
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 2
    line = _line(err)
    assert re.match(rf"kdt: error: {re.escape(str(out / 'kd'))}/\S+: {words}; nothing finished was lost", line), line
    _assert_same_stage(reference, out, "teacher")
    _assert_nothing_corrupt(out)
    # free the space (or make the disk writable) and run the same command again
    if how == "full":
        (tmpfs / "filler").unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    plugins()
    _quick_training_curves(monkeypatch, (reference / "training.png").read_bytes())
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 0, err
    _assert_identical_runs(reference, out)
    assert not _temps(out)


# --------------------------------------------------------------------------- a full disk under DDP

DISKFULL_SOURCE = '''
"""kdt test plugin: after the epoch named by $KDT_DISKFULL (STAGE:EPOCH) every write fails with ENOSPC."""

import errno
import os

from kdtoolkit.plugin.hookspecs import hookimpl


@hookimpl
def kdt_after_epoch(stage, phase, epoch, metrics):
    if os.environ.get("KDT_DISKFULL") != f"{stage}:{epoch}":
        return
    from kdtoolkit.foundation import io

    def full(fd, data, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    io._write_fd = full
'''


# linear heads: a model with buffers (ProtoPNet's) meets a dead peer first in DDP's buffer broadcast,
# which kdtoolkit.foundation.distributed does not turn into one line yet (whatever rank 0's error was)
DDP_RECIPE = """
[data]
dataset = "digits"
image_size = 8
batch_size = 32
augment = false

[stages.teacher]
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 2
limit_batches = 2
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]
"""


def test_a_full_disk_on_rank_0_of_a_distributed_run_ends_every_rank_with_one_line(tmp_path):
    """Two ranks started by hand, as torchrun would: the disk fills on rank 0 (the only one that
    writes) after the teacher's first epoch; rank 0 names the file, rank 1 stops at its next
    collective, both with one line and exit code 2, nobody hangs."""
    import socket

    from kdt_faultutil import GATE_MODULE, plugin_env

    site = make_gate_plugin(tmp_path / "site")
    (site / "kdt_diskfull_plugin.py").write_text(DISKFULL_SOURCE)
    info = site / "kdt_diskfull_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdt_diskfull_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdt]\ndiskfull = kdt_diskfull_plugin\n")
    assert GATE_MODULE  # tinyconv comes from the gate plugin beside it
    recipe = tmp_path / "r.toml"
    recipe.write_text(DDP_RECIPE)
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = plugin_env(
        site, OMP_NUM_THREADS="1", KDT_DISKFULL="teacher:1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kdtoolkit", "run", str(recipe), "--out", str(out), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    results = []
    try:
        for p in procs:
            results.append((p.communicate(timeout=240), p.returncode))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    expected = [
        f"kdt: error: {out / 'teacher' / 'checkpoint.safetensors'}: no space left on device; nothing finished was lost",
        "another process of the distributed run",
    ]
    for ((_stdout, stderr), code), words in zip(results, expected):
        assert code == 2, stderr
        assert "Traceback" not in stderr
        lines = [l for l in stderr.splitlines() if l.startswith("kdt: error:")]
        assert len(lines) == 1 and words in lines[0], stderr
    assert not _temps(out)


# --------------------------------------------------------------------------- links planted in a run directory


def test_a_resume_never_writes_through_a_metrics_log_linked_outside(clean, plugins, capsys, monkeypatch, tmp_path):
    """``metrics.jsonl`` is the one file written in place (appended, cut back on resume): a link planted
    there by an unpacked run directory is refused, and the file it points to is left as it was."""
    recipe, reference, writes = clean
    out = tmp_path / "run"
    _fail_write(monkeypatch, writes.index(str(reference / "kd" / "model.safetensors")) + 1, out)
    assert _main(capsys, "run", str(recipe), "--out", str(out), "-q")[0] == 2
    monkeypatch.undo()
    assert (out / "kd" / "checkpoint.safetensors").exists()  # the stage will resume and cut its log back
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"x" * 100_000)
    log = out / "kd" / "metrics.jsonl"
    log.unlink()
    log.symlink_to(victim)
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 2
    assert (
        _line(err)
        == f"kdt: error: {log}: refusing to write through a symbolic link (a run directory's files are its own)"
    )
    assert victim.read_bytes() == b"x" * 100_000


def test_append_line_refuses_links_and_special_files(tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text("keep\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(target)
    with pytest.raises(KdtError, match="symbolic link"):
        kio.append_line(link, "{}")
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "missing.jsonl")
    with pytest.raises(KdtError, match="symbolic link"):
        kio.append_line(dangling, "{}")
    assert not (tmp_path / "missing.jsonl").exists()
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(KdtError, match="not a regular file"):  # refused without blocking
        kio.open_for_update(fifo, os.O_RDWR)
    assert target.read_text() == "keep\n"
    kio.append_line(tmp_path / "new.jsonl", "{}")
    assert (tmp_path / "new.jsonl").read_text() == "{}\n"


def test_a_fifo_in_place_of_result_json_is_no_hang(clean, plugins, capsys, tmp_path):
    """A run directory whose ``result.json`` is a FIFO (or a link to ``/dev/zero``) is read without
    blocking: the stage counts as unreadable and ``kdt run`` says so in one line."""
    recipe, reference, _ = clean
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "teacher" / "result.json").unlink()
    os.mkfifo(out / "teacher" / "result.json")
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 2
    assert "not a regular file (a FIFO)" in _line(err)
