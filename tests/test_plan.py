"""``steppo plan``: compiles a config's programs ahead of time for host CPU devices or a TPU
topology (libtpu, no TPU), without weights, and says whether they fit.

Each run is its own process (the CPU device count and the platform are set before JAX starts;
two processes may load libtpu at once with ALLOW_MULTIPLE_LIBTPU_LOAD=1)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steppo_jax.train import plan
from steppo_jax.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# one layer, no critic (GRPO), short rows: every compile takes seconds
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
        "algo.estimator=grpo", "rollout.tasks_per_iter=2", "rollout.group_size=2", "rollout.max_context=128",
        "rollout.max_new_tokens=16", "optim.minibatches=1", "env.eval_tasks=4"]
KEYS = {"argument_bytes", "temp_bytes", "output_bytes", "peak_bytes", "flops", "compile_s"}


def steppo_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "steppo_jax.cli", "plan", "--config", "configs/default.yaml", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cpu_devices_json():
    proc = steppo_plan("--cpu-devices", "2", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["topology"] == "cpu-2" and report["devices"] == 2 and report["hbm_bytes"] is None
    assert report["fits"] is True and set(report["programs"]) == set(plan.PROGRAMS)
    for name, row in report["programs"].items():
        assert KEYS <= set(row), name
        assert row["argument_bytes"] > 0 and row["peak_bytes"] > 0 and row["flops"] > 0, (name, row)
    # score: policy + reference forward (default.yaml has a KL term); update: forward + backward
    # (3 forwards) of a minibatch, which is the whole batch here
    assert math.isclose(report["programs"]["update"]["flops"], 1.5 * report["programs"]["score"]["flops"])


def test_slot_engine_programs():
    """With ``rollout.engine: slots`` the sampler entries are the slot engine's prefill and
    decode over a cache of ``rollout.slots`` rows: on one device a decode of ``decode_rows`` of
    them and prefills of 1 or 2 rows; on a batch split over 2 devices every call on every row."""
    for devices, extra, rows, programs in (("1", ["rollout.decode_rows=2"], 2, 2 * 1 + 2 * 5), ("2", [], 4, 1 + 5)):
        proc = steppo_plan("--cpu-devices", devices, "--json", "--programs", "prefill,decode", *TINY,
                           "rollout.engine=slots", *extra)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert set(report["programs"]) == {"prefill", "decode"} and report["fits"] is True
        shapes = report["shapes"]
        assert (shapes["cache_rows"], shapes["decode_rows"]) == (4, rows)
        # one device: decode widths 1, 2 x 1 span (128); prefill rows 1, 2 x 5 widths (8 .. 128);
        # two: decode 4 rows x 1 span, prefill 4 rows x 5 widths
        assert shapes["slot_programs"] == programs
        for row in report["programs"].values():
            assert row["argument_bytes"] > 0 and row["peak_bytes"] > 0 and row["flops"] > 0


def test_asynchronous_training_holds_the_sampler_beside_the_update():
    """With max_staleness 1 the sampler keeps its weights and cache while the update runs: the
    update's row holds, beside its peak, the reference (its resident bytes when synchronous)
    and the largest sampler peak; each sampler program's row the update's peak + the reference."""
    reports = []
    for extra in ((), ("rollout.max_staleness=1", "algo.behavior_weight_cap=2")):
        proc = steppo_plan("--cpu-devices", "2", "--json", "--programs", "update,prefill,decode", *TINY, *extra)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout)["programs"])
    sync, rows = reports
    ref = sync["update"]["resident_bytes"]  # default.yaml has a KL term: the reference
    assert ref > 0
    sampler = max(rows["prefill"]["peak_bytes"], rows["decode"]["peak_bytes"])
    assert rows["update"]["resident_bytes"] == ref + sampler
    for name in ("prefill", "decode"):
        assert rows[name]["resident_bytes"] == rows["update"]["peak_bytes"] + ref != sync[name]["resident_bytes"]
    cfg = load_config(ROOT / "configs/default.yaml", ["rollout.max_staleness=1", "algo.behavior_weight_cap=2"])
    sync_cfg = load_config(ROOT / "configs/default.yaml")
    for name in plan.PROGRAMS:  # asynchronous training's first knob: train synchronously
        assert plan.knobs(cfg, name)[0] == "rollout.max_staleness" not in plan.knobs(sync_cfg, name)


def test_tpu_topology_with_only_a_config_json(tmp_path):
    """An HF model directory holding nothing but config.json plans on a v5e-4 (4 chips)."""
    config = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
              "tie_word_embeddings": True, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = steppo_plan("--topology", "v5e-4", "--json", "--programs", "score,prefill", *TINY, "model.source=hf",
                       f"model.hf_path={tmp_path}", "model.compute_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["devices"] == 4 and report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
    assert set(report["programs"]) == {"score", "prefill"}
    for row in report["programs"].values():
        assert 0 < row["peak_bytes"] < report["hbm_bytes"] and row["est_s"] > 0


def test_does_not_fit_names_the_program_and_the_knobs():
    # a million-token row: the dense [T, T] attention scores alone need terabytes
    proc = steppo_plan("--topology", "v5e-1", "--programs", "score", *TINY, "rollout.max_context=1048576")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("steppo plan: score does not fit v5e-1: ") and "rollout.max_context" in line
    assert "OOM" in proc.stdout  # the table is printed too


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9z-8"], "unknown topology 'v9z-8'; known: v4-8,"),
    (["--topology", "v5e-4", "rollout.group_size=0"], "rollout.group_size = 0 must be >= 1"),
    (["--cpu-devices", "1", "--programs", "train"], "unknown program(s) train"),
    (["--cpu-devices", "2", *TINY, "rollout.engine=slots", "rollout.decode_rows=2"],
     "rollout.decode_rows: decode_rows=2 below the 4 slots needs the sampler's batch on one device"),
    (["--topology", "v5e-32", *TINY, "rollout.tasks_per_iter=8", "rollout.max_staleness=1",
      "algo.behavior_weight_cap=2"], "rollout.max_staleness=1 (asynchronous training) runs in one process, not 8"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = steppo_plan(*args, "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr.strip().splitlines()[-1]


def test_topology_table():
    assert plan.topology("v5p-64").shape == "2x4x4"  # v5p names count TensorCores: 32 chips
    assert plan.topology("v5litepod-32") == plan.topology("v5e-32")
    assert plan.topology("v4-32").host == (2, 2, 1) and plan.topology("v6e-8").host == (2, 4, 1)
    assert plan.host_topology(plan.topology("v5e-32")).shape == "2x2"
    for topo in plan.TOPOLOGIES.values():
        chips = math.prod(int(n) for n in topo.shape.split("x"))
        assert chips * topo.chip.cores_per_chip == int(topo.name.split("-")[1])


def test_out_of_memory_message_is_parsed():
    message = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
    assert plan._over_bytes(message) == int(4.75 * 2**30)
    assert plan._over_bytes("Exceeded hbm capacity by 512.0M") == 512 * 2**20
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(96.17G) exceeds available HBM (15.75G).")
    assert plan._over_bytes(message) == int(96.17 * 2**30 - 15.75 * 2**30)
