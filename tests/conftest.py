"""Shared fixtures."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

# kdtoolkit's per-user caches (timm's model names) go to a folder of this test session.
os.environ.setdefault("KDT_CACHE_DIR", tempfile.mkdtemp(prefix="kdt-test-cache-"))

from kdt_testutil import proto_recipe


@pytest.fixture(scope="session")
def proto_run(tmp_path_factory):
    """A finished tiny Proto2Proto run (teacher, baseline, kd): (recipe path, run dir, results)."""
    from kdtoolkit.cli.commands import main

    d = tmp_path_factory.mktemp("proto_run")
    recipe = d / "p2p.toml"
    recipe.write_text(proto_recipe())
    out = d / "run"
    assert main(["run", str(recipe), "--out", str(out), "-q"]) == 0
    return recipe, out, json.loads((out / "results.json").read_text())
