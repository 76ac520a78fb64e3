"""Hostile inputs: bounded reads and one clear line (exit code 2) for files and recipes made to hurt.

Each test is the hostile input itself (issue 29, defects 9, 10, 11, 13, 14):

- safetensors files whose header would make kdtoolkit read gigabytes (a sparse
  file of many GB but a few KB on disk, a header with inconsistent offsets, a
  header nested 100k levels deep) are refused from their header, before any
  tensor is read (the loaders are patched to fail if called);
- recipes nested 600 or 5000 levels deep, or values out of range (a seed that
  no 64-bit generator takes, a huge or negative image size, a huge batch) are
  refused by ``kdt validate`` naming the key;
- FIFOs and links to ``/dev/zero`` in an image folder are listed by
  ``kdt check`` (which must not hang on them) and refused by ``kdt predict``;
- an image whose header declares 12000x12000 pixels is refused before it is
  decoded, with one line and no Pillow warning; the limit is configurable
  (``KDT_MAX_IMAGE_PIXELS``).

Commands that could block on a FIFO run in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from kdt_faultutil import ROOT, kdt_cmd, load_gate_module, make_gate_plugin, one_line_error, plugin_env
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.manager import PluginManager, set_manager

RECORDS_FORMAT = "kdtoolkit.results.records/1"

RECIPE = """
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 64

[stages.solo]
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]

[[stages.solo.phases]]
epochs = 1
limit_batches = 1
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]
"""

FOLDER_RECIPE = RECIPE.replace('dataset = "digits"', 'dataset = "image_folder"\nroot = "{root}"').replace(
    "batch_size = 32", "batch_size = 2"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return make_gate_plugin(tmp_path_factory.mktemp("hostile") / "site")


@pytest.fixture
def gate(site):
    """The gate plugin's ``tinyconv`` backbone in-process; the default manager restored after."""
    set_manager(PluginManager(extra=[(load_gate_module(site), "gate")]))
    yield
    set_manager(None)


def _one_line(capsys, argv: list[str]) -> str:
    """Run ``kdt ARGV`` in-process: exit code 2 and one ``kdt: error:`` line, no traceback, no warning."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [l for l in captured.err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdt: error: "), captured.err
    return lines[0]


# --------------------------------------------------------------------------- safetensors headers


def _safetensors(
    path: Path, entries: dict, data_bytes: int, meta: dict | None = None, raw: bytes | None = None
) -> Path:
    """A safetensors file whose header is ``entries`` (or ``raw``), made ``data_bytes`` long with
    ``truncate``: a sparse file, a few KB on disk whatever its size."""
    header = (
        raw if raw is not None else json.dumps({"__metadata__": meta or {"format": RECORDS_FORMAT}, **entries}).encode()
    )
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + data_bytes)
    return path


def _records_entries(n: int, p: int = 1) -> tuple[dict, int]:
    """Header entries of a records file of ``n`` images (labels, logits, min_distances, argmin)."""
    out, off = {}, 0
    for name, dtype, shape, size in (
        ("labels", "I64", [n], 8),
        ("logits", "F32", [n, 10], 4),
        ("min_distances", "F32", [n, p], 4),
        ("argmin", "I64", [n, p], 8),
    ):
        nbytes = size
        for d in shape:
            nbytes *= d
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    return out, off


@pytest.fixture
def no_tensor_read(monkeypatch):
    """Fail the test if any tensor of a safetensors file is read."""
    import safetensors.numpy
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    for mod in (safetensors.numpy, safetensors.torch):
        monkeypatch.setattr(mod, "load_file", refuse)
        monkeypatch.setattr(mod, "safe_open", refuse, raising=False)


def test_sparse_multi_gb_records_without_the_tensors_are_refused_unread(tmp_path, capsys, no_tensor_read):
    n = 4 * 10**9 // 4
    bad = _safetensors(
        tmp_path / "sparse.safetensors", {"x": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}, 4 * n
    )
    assert bad.stat().st_size > 4 * 10**9
    line = _one_line(capsys, ["metrics", "--teacher", str(bad), "--student", str(bad)])
    assert str(bad) in line and "no tensor 'labels'" in line
    if bad.stat().st_blocks * 512 < 10**6:  # where the file system keeps it sparse, the message says so
        assert "sparse" in line


def test_records_too_large_for_the_memory_left_are_refused_unread(tmp_path, capsys, no_tensor_read, monkeypatch):
    import kdtoolkit.foundation.limits as limits

    entries, size = _records_entries(10**8)  # 3.2 GB of tensors, a few KB on disk
    bad = _safetensors(tmp_path / "big.safetensors", entries, size)
    monkeypatch.setattr(limits, "_meminfo_available", lambda: 10**9)  # 1 GB available
    line = _one_line(capsys, ["metrics", "--teacher", str(bad), "--student", str(bad)])
    assert str(bad) in line and "more than the 1.0 GB of available memory" in line and "not read" in line


def test_a_20_gb_records_file_under_an_address_space_limit_is_one_line(tmp_path):
    """Under ``ulimit -v`` a 20 GB file was a MemoryError traceback: now it is refused before it is read."""
    entries, size = _records_entries(20 * 10**9 // 32)
    bad = _safetensors(tmp_path / "g20.safetensors", entries, size)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY))\n"
        "from kdtoolkit.cli.commands import main\n"
        f"sys.exit(main(['metrics', '--teacher', {str(bad)!r}, '--student', {str(bad)!r}]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    line = one_line_error(proc)
    assert proc.returncode == 2 and str(bad) in line and "not read" in line


@pytest.mark.parametrize("case", ["span", "overlap", "gap", "past_end", "short_of_end", "dtype", "negative", "shape"])
def test_inconsistent_safetensors_headers_are_refused_before_reading(tmp_path, capsys, no_tensor_read, case):
    good, size = _records_entries(10)
    entries = json.loads(json.dumps(good))
    if case == "span":  # 10 int64 labels need 80 bytes, not 40
        entries["labels"]["data_offsets"][1] -= 40
    elif case == "overlap":
        entries["logits"]["data_offsets"] = [40, 440]
    elif case == "gap":
        entries["logits"]["data_offsets"] = [88, 488]
    elif case == "past_end":
        size -= 8  # the header lists 8 bytes more than the file holds
    elif case == "short_of_end":
        size += 10**9  # a gigabyte after the last tensor
    elif case == "dtype":
        entries["labels"]["dtype"] = "Q7"
    elif case == "negative":
        entries["labels"]["data_offsets"] = [-80, 0]
    elif case == "shape":
        entries["labels"]["shape"] = [10, True]
    bad = _safetensors(tmp_path / f"{case}.safetensors", entries, size)
    line = _one_line(capsys, ["metrics", "--teacher", str(bad), "--student", str(bad)])
    assert str(bad) in line


def test_safetensors_header_nested_100k_levels_deep(tmp_path, capsys, no_tensor_read):
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = _safetensors(tmp_path / "deep.safetensors", {}, 0, raw=raw)
    line = _one_line(capsys, ["metrics", "--teacher", str(bad), "--student", str(bad)])
    assert str(bad) in line and "nested too deeply" in line


def test_records_with_rows_that_disagree_are_refused_from_the_header(tmp_path, capsys, no_tensor_read):
    entries, size = _records_entries(10)
    entries["argmin"]["shape"] = [5, 2]  # the same bytes, 5 rows instead of 10
    bad = _safetensors(tmp_path / "rows.safetensors", entries, size)
    line = _one_line(capsys, ["metrics", "--teacher", str(bad), "--student", str(bad)])
    assert str(bad) in line and "'argmin'" in line and "expected 10" in line


# --------------------------------------------------------------------------- deep recipes and run files


@pytest.mark.parametrize("depth", [600, 5000])
@pytest.mark.parametrize("shape", ["array", "table", "inline"])
def test_deeply_nested_recipes_are_one_line(tmp_path, capsys, depth, shape):
    recipe = tmp_path / f"deep-{shape}-{depth}.toml"
    if shape == "array":
        recipe.write_text("x = " + "[" * depth + "]" * depth + "\n")
    elif shape == "table":
        recipe.write_text("[" + ".".join(["a"] * depth) + "]\nv = 1\n")
    else:
        recipe.write_text("x = " + "{ a = " * depth + "1" + " }" * depth + "\n")
    line = _one_line(capsys, ["validate", str(recipe)])
    assert str(recipe) in line and "nested" in line


def test_deeply_nested_set_value_and_long_extends_chain(tmp_path, capsys, gate):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    line = _one_line(capsys, ["validate", str(recipe), "--set", "data.x=" + "[" * 5000 + "]" * 5000])
    assert "--set" in line and "data.x" in line and "nested" in line
    for i in range(200):
        (tmp_path / f"e{i}.toml").write_text(f'extends = "e{i + 1}.toml"\n')
    (tmp_path / "e200.toml").write_text(RECIPE)
    line = _one_line(capsys, ["validate", str(tmp_path / "e0.toml")])
    assert "extends" in line


def test_deeply_nested_run_files_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.json").write_text('{"stages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    line = _one_line(capsys, ["report", str(run)])
    assert str(run / "recipe.resolved.json") in line and "nested too deeply" in line
    (run / "recipe.resolved.json").write_text('{"stages": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}")
    line = _one_line(capsys, ["report", str(run)])
    assert str(run / "recipe.resolved.json") in line and "nested" in line


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "assignment, key",
    [
        ("seed=99999999999999999999999", "seed"),
        ("seed=" + "9" * 5000, "seed"),
        ("seeds=[1, 99999999999999999999]", "seeds[1]"),
        ("stages.solo.seed=18446744073709551616", "stages.solo.seed"),
        ("data.image_size=100000", "data.image_size"),
        ("data.image_size=-16", "data.image_size"),
        ("data.batch_size=100000000", "data.batch_size"),
        ("data.eval_batch_size=100000000", "data.eval_batch_size"),
        ("data.num_workers=1000000", "data.num_workers"),
        ("stages.solo.phases[0].epochs=10000000000", "stages.solo.phases[0].epochs"),
        ("stages.solo.phases[0].groups[0].lr=" + "9" * 400, "stages.solo.phases[0].groups[0].lr"),
    ],
)
def test_numbers_out_of_range_are_refused_by_validate(tmp_path, capsys, gate, assignment, key):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    line = _one_line(capsys, ["validate", str(recipe), "--set", assignment])
    assert f" {key}: " in line, line


def test_a_batch_of_large_images_is_refused_by_the_input_batch_estimate(tmp_path, capsys, gate):
    """``image_folder`` caps image_size at 4096; a batch of 4096² images still has to fit the input-batch limit."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(FOLDER_RECIPE.replace("{root}", str(tmp_path)))
    line = _one_line(capsys, ["validate", str(recipe), "--set", "data.image_size=4096", "--set", "data.batch_size=512"])
    assert " data.batch_size: " in line and "GiB" in line


def test_the_largest_seeds_validate(tmp_path, capsys, gate):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    assert (
        main(["validate", str(recipe), "--set", "seed=9223372036854775807", "--set", "seeds=[0, 9223372036854775807]"])
        == 0
    )
    assert "seed = 9223372036854775807" in capsys.readouterr().out


def test_a_huge_seeds_option_is_one_line(tmp_path, capsys, gate):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    line = _one_line(capsys, ["run", str(recipe), "--out", str(tmp_path / "out"), "--seeds", "0," + "9" * 5000, "-q"])
    assert "--seeds" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- special files and large images


def _png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\0" * (1 + 3 * width) * min(height, 4))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )
    return path


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 20), (100 * c, 50 * i, 0)).save(root / split / cls / f"{i}.png")
    return root


def _subprocess(site: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python -m kdtoolkit ARGS`` with a timeout: a read blocking on a FIFO fails the test, it does not hang."""
    try:
        return subprocess.run(
            kdt_cmd(*args),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            env=plugin_env(site, OMP_NUM_THREADS="1", **env),
        )
    except subprocess.TimeoutExpired:  # pragma: no cover - the defect itself
        pytest.fail(f"kdt {' '.join(args)} hung on a special file")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_kdt_check_lists_fifos_and_links_to_devices_and_does_not_hang(tmp_path, site):
    root = _image_folder(tmp_path / "images")
    fifo = root / "train" / "a" / "pipe.png"
    os.mkfifo(fifo)
    zero = root / "test" / "b" / "zero.jpg"
    zero.symlink_to("/dev/zero")
    other = root / "train" / "b" / "notes"  # a FIFO without an image suffix is reported too
    os.mkfifo(other)
    recipe = tmp_path / "r.toml"
    recipe.write_text(FOLDER_RECIPE.replace("{root}", str(root)))
    proc = _subprocess(site, ["check", str(recipe), "-q"])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "all readable" not in proc.stdout
    lines = proc.stderr.splitlines()
    for path, kind in ((fifo, "a FIFO"), (zero, "a link to a character device"), (other, "a FIFO")):
        assert any(l.startswith(f"{path}: not a regular file ({kind}") for l in lines), proc.stderr
    assert lines[-1].startswith(f"kdt: error: {recipe}: 3 special files") and len(lines) == 4


@pytest.fixture(scope="module")
def stage(site, tmp_path_factory) -> Path:
    """A trained one-stage run (tinyconv, digits 16 px): its stage directory."""
    d = tmp_path_factory.mktemp("hostile_run")
    (d / "r.toml").write_text(RECIPE)
    set_manager(PluginManager(extra=[(load_gate_module(site), "gate")]))
    try:
        assert main(["run", str(d / "r.toml"), "--out", str(d / "run"), "-q"]) == 0
    finally:
        set_manager(None)
    return d / "run" / "solo"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_kdt_predict_says_a_fifo_is_not_a_regular_file(tmp_path, site, stage):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    proc = _subprocess(site, ["predict", str(stage), str(fifo), "-q"])
    line = one_line_error(proc)
    assert proc.returncode == 2 and f"{fifo}: not a regular file (a FIFO)" in line
    folder = tmp_path / "folder"
    folder.mkdir()
    _png(folder / "ok.png", 16, 16)
    (folder / "zero.png").symlink_to("/dev/zero")
    proc = _subprocess(site, ["predict", str(stage), str(folder), "-q"])
    line = one_line_error(proc)
    assert proc.returncode == 2 and f"{folder / 'zero.png'}: not a regular file (a link to a character device" in line


def test_kdt_predict_refuses_a_12000_square_png_before_decoding_it(tmp_path, capsys, gate, stage, monkeypatch):
    monkeypatch.delenv("KDT_MAX_IMAGE_PIXELS", raising=False)
    big = _png(tmp_path / "big.png", 12000, 12000)
    assert big.stat().st_size < 10_000
    import PIL.ImageFile

    decoded = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    line = _one_line(capsys, ["predict", str(stage), str(big), "-q"])
    assert f"{big}: image of 12000x12000 (144.0 megapixels) is over the limit" in line
    assert "KDT_MAX_IMAGE_PIXELS" in line and "DecompressionBomb" not in line
    assert (12000, 12000) not in decoded  # refused from the header


def test_the_pixel_limit_is_configurable(tmp_path, capsys, gate, stage, monkeypatch):
    small = _png(tmp_path / "small.png", 40, 40)
    monkeypatch.setenv("KDT_MAX_IMAGE_PIXELS", "1000")
    line = _one_line(capsys, ["predict", str(stage), str(small), "-q"])
    assert f"{small}: image of 40x40 (0.0 megapixels) is over the limit" in line and "(1000 pixels)" in line
    monkeypatch.setenv("KDT_MAX_IMAGE_PIXELS", "0")  # no limit
    assert main(["predict", str(stage), str(small), "-q", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(small)
    monkeypatch.setenv("KDT_MAX_IMAGE_PIXELS", "lots")
    line = _one_line(capsys, ["predict", str(stage), str(small), "-q"])
    assert "KDT_MAX_IMAGE_PIXELS" in line


def test_kdt_check_lists_images_over_the_pixel_limit(tmp_path, capsys, gate, monkeypatch):
    monkeypatch.delenv("KDT_MAX_IMAGE_PIXELS", raising=False)
    root = _image_folder(tmp_path / "images")
    big = _png(root / "train" / "a" / "big.png", 12000, 12000)
    recipe = tmp_path / "r.toml"
    recipe.write_text(FOLDER_RECIPE.replace("{root}", str(root)))
    code = main(["check", str(recipe), "-q"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err and "DecompressionBomb" not in captured.err
    assert f"{big}: image of 12000x12000" in captured.err
    assert captured.err.splitlines()[-1] == (
        f"kdt: error: {recipe}: 1 of 9 images cannot be read (listed above); fix or remove them"
    )


def test_the_cgroup_memory_left_counts_reclaimable_page_cache(tmp_path):
    """cgroup v2 counts the page cache in ``memory.current``: a container that has just read its dataset
    still has the reclaimable part (``inactive_file``) to load a checkpoint into."""
    from kdtoolkit.foundation.limits import _cgroup_available

    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    folder = tmp_path / "fs" / "job"
    folder.mkdir(parents=True)
    (folder / "memory.max").write_text(f"{8 * 2**30}\n")
    (folder / "memory.current").write_text(f"{8 * 2**30 - 2**20}\n")
    (folder / "memory.stat").write_text(f"anon 1000\nfile {6 * 2**30}\ninactive_file {5 * 2**30}\n")
    assert _cgroup_available(proc, tmp_path / "fs") == 5 * 2**30 + 2**20
    (folder / "memory.stat").unlink()
    assert _cgroup_available(proc, tmp_path / "fs") == 2**20
    (folder / "memory.max").write_text("max\n")
    assert _cgroup_available(proc, tmp_path / "fs") is None
