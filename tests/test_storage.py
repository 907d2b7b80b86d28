"""Run directories on a bucket: metrics, plots, config, summary and checkpoints under ``gs://``.

``gs://`` is served by an in-memory fsspec filesystem registered under the ``gs``/``gcs``
protocols, the route etils.epath (and so orbax's directory operations) takes to a bucket. Orbax
writes array data through tensorstore's own GCS driver, which this fake cannot serve: the
checkpoint test opens and lists a bucket directory but saves nothing (checkpoint round trips
are tested on local disk in test_checkpoint.py and test_train.py).
"""

import importlib
import json

import numpy as np
import pytest
import yaml
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from orbax.checkpoint._src.path import gcs_utils

from steppo_jax.train.checkpoint import CheckpointManager
from steppo_jax.train.config import load_config, save_config
from steppo_jax.train.metrics import MetricsWriter, plot_metrics, read_metrics, write_summary
from steppo_jax.train.storage import as_path, write_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# protocol -> filesystem class (the package's `fsspec.registry` is a read-only view of it)
FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry


class FakeBucket(MemoryFileSystem):
    """``gs://`` kept in memory (its own store, apart from ``memory://``)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix) if isinstance(path, str) else path
        return super()._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The fake bucket's files (path -> bytes); the test runs in an empty working directory,
    which must stay empty (nothing written to a local ``gs:/…`` by mistake)."""
    FakeBucket.store, FakeBucket.pseudo_dirs = {}, [""]
    FakeBucket.clear_instance_cache()
    for name in ("gs", "gcs"):
        monkeypatch.setitem(FSSPEC_REGISTRY, name, FakeBucket)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath goes through fsspec
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)

    def files():
        return {path.lstrip("/"): f.getvalue() for path, f in FakeBucket.store.items()}

    yield files
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert not list(tmp_path.iterdir()), "a bucket path was written to local disk"


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
    lines = bucket()["bkt/runs/x/metrics.jsonl"].decode().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    with MetricsWriter(run, resume_iteration=2) as writer:  # resumed from the checkpoint of iteration 2
        writer.write(3, {"reward/mean": 3.0})
    records = read_metrics(f"{run}/metrics.jsonl")
    assert [(r["iteration"], r["reward/mean"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 3.0)]

    assert plot_metrics(f"{run}/metrics.jsonl", f"{run}/curves.png") == f"{run}/curves.png"
    assert write_summary(run, {"final_success_rate": np.float32(0.5)}) == f"{run}/summary.json"
    cfg = load_config(None, [f"run_dir={run}", "algo.estimator=grpo"])
    save_config(cfg, f"{run}/config.yaml")

    files = bucket()
    assert sorted(files) == ["bkt/runs/x/config.yaml", "bkt/runs/x/curves.png", "bkt/runs/x/metrics.jsonl",
                             "bkt/runs/x/summary.json"]
    assert files["bkt/runs/x/curves.png"].startswith(PNG_MAGIC) and len(files["bkt/runs/x/curves.png"]) > 5_000
    assert json.loads(files["bkt/runs/x/summary.json"]) == {"final_success_rate": 0.5}
    assert yaml.safe_load(files["bkt/runs/x/config.yaml"])["algo"]["estimator"] == "grpo"


def test_checkpoint_manager_keeps_a_bucket_uri(bucket, monkeypatch):
    # orbax asks google-cloud-storage about the bucket's layout: a plain bucket
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    with CheckpointManager("gs://bkt/runs/x/checkpoints") as manager:
        assert manager.directory == "gs://bkt/runs/x/checkpoints"
        assert manager.latest_step() is None
    assert FakeBucket().isdir("gs://bkt/runs/x/checkpoints")  # created on the bucket, not locally
