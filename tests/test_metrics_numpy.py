"""AAP/AJS/PMS without torch: numpy records, threads, and ``kdt metrics`` on records files.

The metrics are computed with numpy and scipy on numpy arrays or torch
tensors alike; records files load as numpy arrays; blocks of images run on
threads. Every number must equal the torch-tensor path and the one-thread
path (exactly: integer counts, the same float operations per entry).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdt_proto2proto import metrics as M
from kdtoolkit.foundation.errors import CheckpointError
from kdtoolkit.foundation.io import read_safetensors
from kdtoolkit.results.records import Records

TAUS = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


def _records(seed: int, n: int, p: int, num_locations: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = (rng.integers(0, 12, (n, p)) / 4).astype(np.float32)  # ties with each other and with the thresholds
    d[rng.random((n, p)) < 0.05] = np.inf
    d[rng.random((n, p)) < 0.03] = np.nan
    a = rng.integers(0, num_locations, (n, p))
    return d, a


def test_numpy_records_give_numpy_results_equal_to_torch_ones():
    td, ta = _records(0, 40, 9, 6)
    sd, sa = _records(1, 40, 7, 6)
    m_np = M.location_minima(td, ta, 6)
    m_t = M.location_minima(torch.from_numpy(td), torch.from_numpy(ta), 6)
    assert isinstance(m_np, np.ndarray) and isinstance(m_t, torch.Tensor)
    assert m_np.dtype == np.float32 and m_t.dtype == torch.float32
    np.testing.assert_array_equal(m_np, m_t.numpy())
    mask = M.active_locations(td, ta, 6, 0.5)
    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_
    assert M.aap_by_tau(td, ta, 6, TAUS) == M.aap_by_tau(torch.from_numpy(td), torch.from_numpy(ta), 6, TAUS)
    assert M.ajs_by_tau(td, ta, sd, sa, 6, TAUS) == M.ajs_by_tau(
        torch.from_numpy(td), torch.from_numpy(ta), torch.from_numpy(sd), torch.from_numpy(sa), 6, TAUS
    )
    np.testing.assert_array_equal(
        M.colocation_matrix(ta, sa, 6), M.colocation_matrix(torch.from_numpy(ta), torch.from_numpy(sa), 6)
    )


def test_location_minima_by_definition_with_nan_and_inf():
    d = np.array([[np.nan, 1.0, np.inf, 0.5], [np.inf, np.nan, 2.0, 3.0]], dtype=np.float32)
    a = np.array([[0, 0, 1, 3], [2, 2, 2, 0]])
    got = M.location_minima(d, a, 4)
    # location without prototypes: NaN; only NaN/inf prototypes: +inf; else the smallest distance
    np.testing.assert_array_equal(
        got, np.array([[1.0, np.inf, np.nan, 0.5], [3.0, np.nan, 2.0, np.nan]], dtype=np.float32)
    )


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_minima_threads_and_chunks_change_nothing(monkeypatch, chunk):
    d, a = _records(2, 2100, 12, 9)  # above the size that runs on threads
    monkeypatch.setattr(M, "THREADS", 1)
    monkeypatch.setattr(M, "MINIMA_CHUNK_IMAGES", 10_000)
    one = M.location_minima(d, a, 9)
    monkeypatch.setattr(M, "THREADS", 3)
    monkeypatch.setattr(M, "MINIMA_CHUNK_IMAGES", chunk)
    np.testing.assert_array_equal(M.location_minima(d, a, 9), one)


@pytest.mark.parametrize("method", ["packed", "sparse"])
def test_colocation_threads_change_nothing(monkeypatch, method):
    _, ta = _records(3, 700, 11, 5)
    _, sa = _records(4, 700, 6, 5)
    loop = np.zeros((11, 6), dtype=np.int64)
    for i in range(11):
        for j in range(6):
            loop[i, j] = int((ta[:, i] == sa[:, j]).sum())
    for threads in (1, 2, 5):
        monkeypatch.setattr(M, "THREADS", threads)
        np.testing.assert_array_equal(M.colocation_matrix(ta, sa, 5, method=method, block_images=15), loop)


def test_pms_solves_on_threads_equal_one_thread(monkeypatch):
    rng = np.random.default_rng(5)
    ta = rng.integers(0, 4, (300, 9))
    sa = np.where(rng.random((300, 8)) < 0.6, ta[:, :8], rng.integers(0, 4, (300, 8)))
    monkeypatch.setattr(M, "THREADS", 1)
    one = M.prototype_matching_score(ta, sa, 4)
    monkeypatch.setattr(M, "THREADS", 4)
    many = M.prototype_matching_score(ta, sa, 4)
    assert many.to_json() == one.to_json()
    assert one.score is not None and len(one.costs) == len(one.caps) == 9


def _write_records(path, n=30, p=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(6)
    recs = Records(
        {
            "logits": torch.randn(n, 3, generator=g),
            "labels": torch.arange(n) % 3,
            "min_distances": (torch.rand(n, p, generator=g) * 2).to(dtype),
            "argmin": torch.randint(0, 4, (n, p), generator=g),
        },
        {"stage": path.stem, "H": 2, "W": 2, "dataset": "synthetic"},
    )
    recs.save(path)
    return recs


def test_records_load_as_numpy_equal_torch_and_keep_the_checksum(tmp_path):
    path = tmp_path / "r.safetensors"
    _write_records(path)
    as_torch, as_numpy = Records.load(path), Records.load(path, arrays="numpy")
    assert set(as_numpy.tensors) == set(as_torch.tensors) and as_numpy.meta == as_torch.meta
    for k, v in as_numpy.tensors.items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, as_torch[k].numpy())
        assert v.dtype == as_torch[k].numpy().dtype
    # the content checksum is verified on the numpy path too
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        Records.load(path, arrays="numpy")


def test_bfloat16_records_keep_their_dtype_and_numbers(tmp_path):
    from kdt_proto2proto.compare import run_metrics

    teacher, student = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    t = _write_records(teacher, dtype=torch.bfloat16)
    s = _write_records(student, dtype=torch.bfloat16)
    tensors, _ = read_safetensors(teacher, arrays="numpy")  # numpy has no bfloat16: torch tensors
    assert tensors["min_distances"].dtype == torch.bfloat16
    assert Records.load(teacher).numpy()["min_distances"].dtype == np.float32  # explicit conversion: exact values
    taus = (0.1, 0.45, 1.0, math.inf)
    got = run_metrics(None, teacher, (student,), "0.1,0.45,1,inf", True, tmp_path / "m.json", "cpu")
    # the thresholds are compared in bfloat16, as the torch path does
    assert got["t"]["aap"] == M.aap_by_tau(t["min_distances"], t["argmin"], 4, taus)
    assert got["s"]["ajs"] == M.ajs_by_tau(t["min_distances"], t["argmin"], s["min_distances"], s["argmin"], 4, taus)


def test_kdt_metrics_on_records_files_imports_no_torch(tmp_path):
    teacher, student = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    _write_records(teacher)
    _write_records(student, p=4)
    out = tmp_path / "m.json"
    code = (
        "import sys\nfrom kdtoolkit.cli.commands import _main\n"
        f"code = _main(['metrics', '--teacher', {str(teacher)!r}, '--student', {str(student)!r}, '--pms', "
        f"'--json', {str(out)!r}])\n"
        "assert code == 0, code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    got = json.loads(out.read_text())
    # the same numbers as the torch path, computed here in-process from torch tensors
    t, s = Records.load(teacher), Records.load(student)
    assert got["teacher"]["aap"] == M.aap_by_tau(t["min_distances"], t["argmin"], 4)
    assert got["student"]["ajs"] == M.ajs_by_tau(t["min_distances"], t["argmin"], s["min_distances"], s["argmin"], 4)
    assert got["student"]["pms"] == M.prototype_matching_score(t["argmin"], s["argmin"], 4).score
    assert got["teacher"]["accuracy"] == float((t["logits"].argmax(1) == t["labels"]).float().mean())
