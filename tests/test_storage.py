"""Run directories on a bucket: metrics, plots, config, summary and checkpoints under ``gs://``.

The bucket is a directory of the test's: an fsspec filesystem registered under the ``gs``/``gcs``
protocols (the route etils.epath, and so orbax's directory operations, takes to a bucket) maps
``gs://bkt/x`` to ``<tmp>/bucket/bkt/x``. Orbax's three calls to Google Cloud itself are pointed
at the same directory: the bucket-layout query (a plain bucket), tensorstore's kvstore for array
data (its ``file`` driver instead of ``gcs``) and recursive deletion. Everything else runs
orbax's GCS code paths (commit files instead of renames). The working directory must stay empty:
nothing may land in a local ``gs:/…``.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from steppo_jax.train.checkpoint import CheckpointManager, abstract_like
from steppo_jax.train.config import load_config, save_config
from steppo_jax.train.metrics import MetricsWriter, plot_metrics, read_metrics, write_summary
from steppo_jax.train.storage import as_path, write_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# protocol -> filesystem class (the package's `fsspec.registry` is a read-only view of it)
FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry


class FakeBucket(DirFileSystem):
    """``gs://`` served from the local directory ``FakeBucket.root``."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        return path.removeprefix("gs://").removeprefix("gcs://") if isinstance(path, str) else path


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The fake bucket's directory; the test runs in an empty working directory."""
    root, cwd = tmp_path / "bucket", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(FakeBucket, "root", str(root))
    FakeBucket.clear_instance_cache()
    for name in ("gs", "gcs"):
        monkeypatch.setitem(FSSPEC_REGISTRY, name, FakeBucket)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath goes through fsspec
    backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(path):
        name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / name / key)}

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "rmtree", lambda path, missing_ok=False: epath.Path(path).rmtree(missing_ok))
    monkeypatch.chdir(cwd)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeBucket.clear_instance_cache()
    assert not list(cwd.iterdir()), "a bucket path was written to local disk"


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(as_path("gs://bkt/runs/x/")) == "gs://bkt/runs/x"
    assert str(as_path("gs://bkt/runs/x") / "checkpoints") == "gs://bkt/runs/x/checkpoints"
    assert str(as_path("runs/x")) == str(tmp_path / "runs" / "x")


def test_write_atomic_replaces_whole_files(tmp_path):
    path = write_atomic(str(tmp_path / "a" / "b.txt"), "one")
    write_atomic(path, b"two")
    assert (tmp_path / "a" / "b.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]


def test_metrics_resume_plots_summary_and_config_on_a_bucket(bucket):
    run = "gs://bkt/runs/x"
    with MetricsWriter(run) as writer:
        for i in range(1, 4):
            writer.write(i, {"reward/mean": 0.1 * i, "policy/kl": np.float32(1e-3)})
    lines = (bucket / "bkt/runs/x/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    with MetricsWriter(run, resume_iteration=2) as writer:  # resumed from the checkpoint of iteration 2
        writer.write(3, {"reward/mean": 3.0})
    records = read_metrics(f"{run}/metrics.jsonl")
    assert [(r["iteration"], r["reward/mean"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 3.0)]

    assert plot_metrics(f"{run}/metrics.jsonl", f"{run}/curves.png") == f"{run}/curves.png"
    assert write_summary(run, {"final_success_rate": np.float32(0.5)}) == f"{run}/summary.json"
    cfg = load_config(None, [f"run_dir={run}", "algo.estimator=grpo"])
    save_config(cfg, f"{run}/config.yaml")

    files = {f.name: f.read_bytes() for f in (bucket / "bkt/runs/x").iterdir()}
    assert sorted(files) == ["config.yaml", "curves.png", "metrics.jsonl", "summary.json"]
    assert files["curves.png"].startswith(PNG_MAGIC) and len(files["curves.png"]) > 5_000
    assert json.loads(files["summary.json"]) == {"final_success_rate": 0.5}
    assert yaml.safe_load(files["config.yaml"])["algo"]["estimator"] == "grpo"


def test_checkpoints_save_prune_and_resume_on_a_bucket(bucket):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "rng": jax.random.key(3), "iteration": 5}
    with CheckpointManager("gs://bkt/runs/x/checkpoints", keep=2) as manager:
        assert manager.directory == "gs://bkt/runs/x/checkpoints"
        for step in (1, 2, 3):
            manager.save(step, {**state, "w": step * state["w"], "iteration": step}, {"iteration": step})
    assert sorted(os.listdir(bucket / "bkt/runs/x/checkpoints")) == ["2", "3"]
    with CheckpointManager("gs://bkt/runs/x/checkpoints") as manager:  # a resumed run
        assert manager.all_steps() == [2, 3]
        restored, meta = manager.restore(target=abstract_like(state))
    assert meta == {"iteration": 3}
    np.testing.assert_array_equal(restored["w"], 3 * state["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    assert restored["iteration"] == 3
