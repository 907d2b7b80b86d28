"""The trainer end to end on a tiny model: learning, exact resume, faults, sharding, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from steppo_jax.envs import register, registered
from steppo_jax.train.config import load_config
from steppo_jax.train.rl import Trainer
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.sft import run_sft
from steppo_jax.train.state import build_models
from steppo_jax.train.metrics import read_metrics
from steppo_jax.types import BatchError, validate
from tests.devices import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
if "chain_test" not in registered():
    register("chain_test", "tests.train_envs:ChainEnv")

TINY = ["env.name=chain_test", "env.max_steps=2", "env.eval_tasks=16", "model.d_model=64", "model.n_layers=2",
        "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128", "rollout.group_size=4", "rollout.tasks_per_iter=4",
        "rollout.max_new_tokens=48", "rollout.max_context=512", "sft.steps=150", "sft.num_demos=64",
        "sft.noise=1.0", "sft.batch_size=16", "sft.lr=3e-3", "optim.lr=1e-4", "train.iterations=4",
        "train.eval_every=100", "train.checkpoint_every=2"]


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"run_dir={tmp_path}", *extra])


def warm_start(cfg):
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    policy, _ = run_sft(rt, models, params["policy"], log=lambda _: None)
    return policy


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])  # one seed keeps the suite near 15 minutes on 2 cores
def test_tiny_model_learns(tmp_path, seed):
    """The demo at a smaller size: from the shipped warm start (which answers two-hop
    questions after one search), 10 StepPO iterations raise greedy success on held-out tasks."""
    cfg = load_config(str(ROOT / "configs/default.yaml"),
                      [f"seed={seed}", f"run_dir={tmp_path}", "train.iterations=10", "train.eval_every=5",
                       "train.checkpoint_every=100", "env.eval_tasks=32"])
    summary = Trainer(cfg, log=lambda _: None).fit()
    assert summary["final_success_rate"] >= summary["initial_success_rate"] + 0.25, summary
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["iteration"] for r in records] == list(range(-1, 10))
    assert min(r["reward/mean"] for r in records[1:]) > 0.2  # no collapse along the way
    for key in ("reward/mean", "policy/entropy", "policy/clip_frac", "policy/kl", "value/loss", "value/explained_var",
                "steps/mean", "tokens/action", "time/rollout", "time/passes", "time/update", "eval/success"):
        assert key in records[-1], key
    assert os.path.getsize(os.path.join(tmp_path, "curves.png")) > 10_000
    assert json.loads(Path(tmp_path, "summary.json").read_text())["final_success_rate"] == summary["final_success_rate"]


def test_resume_continues_exactly(tmp_path):
    straight = tiny_config(tmp_path / "a", "sft.steps=20")
    policy = warm_start(straight)
    a = Trainer(straight, policy_params=policy, log=lambda _: None)
    a.fit()
    cfg = tiny_config(tmp_path / "b", "sft.steps=20")
    b = Trainer(cfg, policy_params=policy, log=lambda _: None)
    b.fit(stop_after=2)
    assert b.iteration == 2
    b2 = Trainer(cfg, log=lambda _: None)  # a fresh process would start like this
    b2.fit(resume=True)
    assert b2.iteration == 4
    for x, y in zip(leaves(a.state), leaves(b2.state)):
        np.testing.assert_array_equal(x, y)
    ma = read_metrics(os.path.join(tmp_path / "a", "metrics.jsonl"))
    mb = read_metrics(os.path.join(tmp_path / "b", "metrics.jsonl"))
    assert [r.get("reward/mean") for r in ma] == [r.get("reward/mean") for r in mb]


def test_nan_loss_is_skipped_and_training_goes_on(tmp_path):
    cfg = tiny_config(tmp_path, "sft.steps=20", "train.iterations=2", "train.checkpoint_every=100",
                      "env.options={nan_task: 0}", "rollout.tasks_per_iter=4")
    trainer = Trainer(cfg, policy_params=warm_start(tiny_config(tmp_path / "w", "sft.steps=20")), log=lambda _: None)
    trainer.tasks = lambda it: [(0, 0)] + [(t, 0) for t in range(1, 4)] if it == 0 else [(t, 0) for t in range(4, 8)]
    before = leaves(trainer.state.params)
    first = trainer.step()
    assert first["skipped_updates"] == 4  # every minibatch of the poisoned iteration
    for x, y in zip(before, leaves(trainer.state.params)):
        np.testing.assert_array_equal(x, y)
    second = trainer.step()
    assert second["skipped_updates"] == 0
    assert all(np.all(np.isfinite(x)) for x in leaves(trainer.state.params))
    assert any(np.any(x != y) for x, y in zip(before, leaves(trainer.state.params)))


def test_separate_critic_starts_from_the_warm_started_policy(tmp_path):
    cfg = tiny_config(tmp_path, "seed=3")
    rt = Runtime.create(cfg)
    _, other = build_models(tiny_config(tmp_path, "seed=4"), len(rt.tokenizer), rt.mesh)
    trainer = Trainer(cfg, policy_params=other["policy"], log=lambda _: None)
    params = trainer.state.params
    for x, y in zip(leaves(params["critic"]["trunk"]), leaves(other["policy"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert "value_head" in params["critic"]


def test_separate_critic_of_an_hf_checkpoint_starts_from_its_trunk(tmp_path):
    from flax import nnx

    from steppo_jax.models import save_hf_checkpoint

    cfg = tiny_config(tmp_path)
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    save_hf_checkpoint(nnx.merge(models.policy_def, params["policy"]), str(tmp_path / "hf"))
    hf = tiny_config(tmp_path, "model.source=hf", f"model.hf_path={tmp_path / 'hf'}", "model.critic=separate",
                     "model.tokenizer=null")
    _, loaded = build_models(hf, len(rt.tokenizer), rt.mesh)
    for x, y in zip(leaves(loaded["critic"]["trunk"]), leaves(params["policy"]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_step_rows_layout_packs_steps_and_reports_the_packing(tmp_path):
    cfg = tiny_config(tmp_path, "rollout.layout=step_rows", "rollout.tasks_per_iter=2", "train.iterations=1",
                      "model.n_layers=1", "optim.epochs=1", "optim.minibatches=1")
    trainer = Trainer(cfg, log=lambda _: None)
    layouts = []
    local_batch = trainer._local_batch
    trainer._local_batch = lambda records: layouts.append(local_batch(records)) or layouts[-1]
    metrics = trainer.step()
    batch = validate(layouts[0])
    steps = int(batch.slot_mask().sum())
    finals = int(np.sum(batch.bootstrap_row >= 0))  # a final-state segment per truncated trajectory
    assert finals == int(np.sum(batch.step_mask[:, 0] & ~batch.terminated))
    assert batch.segment_ids is not None and batch.num_slots > 1 and batch.batch_size < steps + finals
    assert batch.batch_size % trainer.rt.row_multiple() == 0
    assert metrics["skipped_updates"] == 0 and metrics["rows"] == batch.batch_size
    assert metrics["tokens/real"] == batch.seq_lens.sum()
    assert metrics["tokens/processed"] == batch.batch_size * batch.seq_len
    assert metrics["tokens/packing_efficiency"] == pytest.approx(metrics["tokens/real"] / metrics["tokens/processed"])

    # every batch the trainer builds is validated: a step mask with a hole stops it, by name
    layout = trainer.rt.layout

    def holed(records, **kw):
        batch = layout(records, **kw)
        mask = np.array(batch.step_mask)
        mask[:, 0] = False  # first steps dropped, later ones kept
        return batch.replace(step_mask=mask)

    trainer.rt.layout = holed
    with pytest.raises(BatchError, match="step_mask"):
        trainer.step()


def test_top_k_sampling_gives_step_weights_below_one(tmp_path):
    """With top-k the sampler's log-probs (of the truncated distribution) are at least the
    trainer's recomputed (untruncated) ones, so every step's TIS weight is at most 1."""
    cfg = tiny_config(tmp_path, "rollout.top_k=5", "algo.behavior_weight_cap=2", "rollout.tasks_per_iter=2",
                      "train.iterations=1", "model.n_layers=1", "optim.epochs=1", "optim.minibatches=1")
    metrics = Trainer(cfg, log=lambda _: None).step()
    assert 0 < metrics["behavior/weight_mean"] < 1 and metrics["behavior/weight_capped_frac"] == 0
    assert metrics["sampler_logp_gap"] > 0 and metrics["skipped_updates"] == 0


def test_environment_failures_are_counted_not_fatal(tmp_path):
    cfg = tiny_config(tmp_path, "sft.steps=20", "env.options={raise_task: 5}")
    trainer = Trainer(cfg, policy_params=warm_start(cfg), log=lambda _: None)
    trainer.tasks = lambda it: [(5, 0), (6, 0), (7, 0), (8, 0)]
    metrics = trainer.step()
    assert metrics["rollout/failed"] == 4  # the group of task 5
    assert metrics["skipped_updates"] == 0


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, "sft.steps=20", "train.iterations=2")
    Trainer(cfg, log=lambda _: None).fit()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, log=lambda _: None).fit()


def run_cli(*args, timeout=600, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "tests.cli_with_test_envs", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_reports_bad_config_and_bad_checkpoint(tmp_path):
    proc = run_cli("train", "--config", "configs/default.yaml", "algo.estimatr=grpo")  # a typo in a key
    assert proc.returncode == 2 and "algo.estimatr" in proc.stderr and "estimator" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    proc = run_cli("eval", "--checkpoint", str(ckpt))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", "configs/default.yaml", "env.options={colour: 3}")
    assert proc.returncode == 2 and "env.options" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", "configs/default.yaml", env={
        "STEPPO_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two"})
    assert proc.returncode == 2 and "JAX_NUM_PROCESSES" in proc.stderr and "Traceback" not in proc.stderr
    help_text = run_cli("--help").stdout
    assert all(cmd in help_text for cmd in ("demo", "sft", "train", "eval", "export"))


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """A run killed after its first checkpoint resumes and finishes with the full metrics."""
    args = ["train", "--config", "configs/default.yaml", *TINY, f"run_dir={tmp_path}", "train.iterations=4",
            "train.checkpoint_every=1", "model.warm_start=null", "env.options={}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.cli_with_test_envs", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "checkpoints"
    import time

    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None, "the run exited before its first checkpoint"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert ckpts.exists(), "the run never wrote a checkpoint"
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 4
    its = [r["iteration"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))]
    assert its == sorted(set(its)) and its[-1] == 3
    # The finished run can be evaluated and exported from its checkpoints.
    ev = run_cli("eval", "--checkpoint", str(ckpts))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["iteration"] == 4
    out = tmp_path / "hf"
    ex = run_cli("export", "--checkpoint", str(ckpts), "--out", str(out))
    assert ex.returncode == 0, ex.stderr[-2000:]
    assert (out / "config.json").exists() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_sharded_training_matches_single_device(tmp_path):
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, "-m", "tests.scripts.sharded_training", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded == single" in proc.stdout


def test_multihost_training_matches_one_process(tmp_path):
    """``steppo train`` as 2 processes (jax.distributed on localhost, 4 CPU devices each) gives
    the metrics and parameters of one process with 8 devices (``--wrong-shard`` on the script
    shows a wrong task split failing the comparison)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.scripts.multihost_training", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "multi-host == single process" in proc.stdout


SMALL = ["model.n_layers=1", "rollout.tasks_per_iter=2", "optim.lr=1e-3", "optim.epochs=1", "optim.minibatches=1",
         "train.iterations=3"]


def test_max_staleness_0_reproduces_the_synchronous_loop(tmp_path):
    """rollout.max_staleness: 0 is the loop as it was before asynchronous training: no rollout
    thread, the rollout of the iteration's own policy, released sampler, then the update; every
    metric but the timings equals the one of those steps run by hand on an identical trainer."""
    trainer = Trainer(tiny_config(tmp_path / "a", *SMALL, "rollout.max_staleness=0"), log=lambda _: None)
    got = trainer.step()
    assert not trainer._worker and "policy_lag/0" not in got and got["time/rollout_collect"] > 0
    by_hand = Trainer(tiny_config(tmp_path / "b", *SMALL, "rollout.max_staleness=0"), log=lambda _: None)
    records = by_hand.engine.collect(by_hand.process_tasks(0), by_hand.cfg.rollout.group_size,
                                     jax.random.fold_in(by_hand.root_key, 0))
    by_hand.sampler.release()
    with jax.set_mesh(by_hand.rt.mesh):
        want = by_hand._learn(0, records, by_hand._local_batch(records))
    assert {k: v for k, v in got.items() if k in want and not k.startswith("time/")} == \
        {k: v for k, v in want.items() if not k.startswith("time/")}
    assert leaves(trainer.state.params) and all(
        np.array_equal(a, b) for a, b in zip(leaves(trainer.state.params), leaves(by_hand.state.params)))


def test_asynchronous_training_tags_lags_and_drops_stale_steps(tmp_path):
    """max_staleness 1: the next iteration's rollout runs during the update (lag 1, or 0 for
    replies drawn after the new weights arrived); steps of a policy older than the bound
    leave the policy loss and are counted (4 slots decoded 2 at a time)."""
    cfg = tiny_config(tmp_path, *SMALL, "rollout.max_staleness=1", "algo.behavior_weight_cap=2",
                      "rollout.engine=slots", "rollout.slots=4", "rollout.decode_rows=2")
    trainer = Trainer(cfg, log=lambda _: None)
    assert (trainer.sampler.batch_size, trainer.sampler.decode_rows) == (4, 2)
    trainer.sampler.set_params(trainer.sampler.params, version=-2)  # iteration 0's steps: lag 2
    first = trainer.step()
    steps = first["steps/mean"] * 8
    assert first["rollout/dropped_stale"] == steps and first["policy_lag/0"] == first["policy_lag/1"] == 0
    assert first["policy/loss"] == 0 and first["policy/entropy"] == 0  # no step left in the policy loss
    assert first["value/loss"] > 0  # the critic still learns from them
    trainer.step()  # its rollout started beside update 0: with version -2 or 1
    third = trainer.step()  # started once update 0 had set version 1
    assert third["rollout/dropped_stale"] == 0
    assert third["policy_lag/0"] + third["policy_lag/1"] == pytest.approx(1.0)
    assert 0 < third["behavior/weight_mean"] <= 2 and third["policy/entropy"] > 0
    trainer.stop_rollouts()
    assert not trainer._rollouts


def test_sft_continues_from_a_checkpoint(tmp_path, capsys):
    """``sft.init`` starts SFT from a checkpoint's policy: at a vanishing learning rate the
    result is that policy, not the fresh initialisation; a missing one is a one-line error."""
    from argparse import Namespace

    from steppo_jax import cli

    def sft(run, *extra):
        overrides = [*TINY, "env.options={}", f"run_dir={tmp_path / run}", "sft.steps=3", "sft.num_demos=8",
                     "sft.batch_size=4", *extra]
        return leaves(cli.cmd_sft(Namespace(config=None, run_dir=None, overrides=overrides))["policy"])

    first = sft("a")
    fresh = sft("b", "sft.lr=1e-30")
    continued = sft("c", f"sft.init={tmp_path / 'a' / 'sft'}", "sft.lr=1e-30")
    assert all(np.allclose(x, y, rtol=0, atol=1e-20) for x, y in zip(first, continued))
    assert max(np.abs(x - y).max() for x, y in zip(first, fresh)) > 1e-4
    missing = f"sft.init={tmp_path / 'nothing'}"
    assert cli.main(["sft", *TINY, "env.options={}", f"run_dir={tmp_path / 'd'}", missing]) == 2
    assert "warm-start checkpoint directory not found" in capsys.readouterr().err
