"""The update and scoring passes: micro-batched equals whole-minibatch (gradients, metrics,
scores), and no [B, T, V] logits are ever built."""

import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from steppo_jax.models import Critic, Decoder, ModelConfig, ValueHead
from steppo_jax.train.config import AlgoSection
from steppo_jax.train.state import Models, TrainState
from steppo_jax.train.update import TrainBatch, behavior_policy, loss_terms, make_update, score
from tests.step_data import packed_batch, random_trajectories
from tests.devices import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
V, B, T, S = 37, 8, 16, 3
CFG = ModelConfig.tiny(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)


def models_and_params(critic: str | None, level: str | None):
    policy = Decoder(CFG, rngs=nnx.Rngs(0))
    head = {"separate": lambda: Critic(CFG, rngs=nnx.Rngs(1)),
            "shared": lambda: ValueHead(CFG.d_model, rngs=nnx.Rngs(1)), None: lambda: None}[critic]()
    policy_def, policy_params = nnx.split(policy)
    critic_def, critic_params = nnx.split(head) if head is not None else (None, None)
    return Models(CFG, policy_def, critic_def, critic, level), {"policy": policy_params, "critic": critic_params}


def random_batch(seed=0) -> TrainBatch:
    """Rows of prompt, up to S steps of actions separated by observations, then padding; row 0
    and row 5 have no step (so some micro-batches hold fewer steps than others)."""
    rng = np.random.default_rng(seed)
    step_ids = np.full((B, T), -1, np.int32)
    value_pos = np.zeros((B, S), np.int32)
    slot_mask = np.zeros((B, S), bool)
    for b in range(B):
        t = int(rng.integers(1, 4))
        for k in range(0 if b in (0, 5) else int(rng.integers(1, S + 1))):
            n = int(rng.integers(1, 4))
            if t + n > T:
                break
            value_pos[b, k], slot_mask[b, k] = t - 1, True
            step_ids[b, t:t + n] = k
            t += n + int(rng.integers(0, 3))
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    act = step_ids >= 0
    return TrainBatch(tokens=rng.integers(0, V, (B, T)).astype(np.int32), step_ids=step_ids,
                      old_logp=np.where(act, -3.6 + 0.3 * f(B, T), 0).astype(np.float32),
                      ref_logp=(-3.6 + 0.3 * f(B, T)), adv_bt=np.where(act, f(B, T), 0).astype(np.float32),
                      returns_bt=f(B, T), old_values_bt=f(B, T), value_pos=value_pos, slot_mask=slot_mask,
                      returns_bs=f(B, S), behavior_weight_bs=rng.uniform(0.5, 2.0, (B, S)).astype(np.float32),
                      segment_ids=None)


# both policy losses, every aggregation, both critic levels; a decoder's update takes seconds to
# compile, so all but two combinations are marked slow
CASES = [("step", "step_mean_token_mean", "shared", "step"), ("token", "token_mean", "shared", "token"),
         *(pytest.param(*case, marks=pytest.mark.slow) for case in [
             ("step", "step_mean_token_sum", "shared", "token"), ("token", "step_mean_token_mean", "separate", "step"),
             ("step", "token_mean", "separate", "token"), ("token", "step_mean_token_sum", None, None)])]


@pytest.mark.parametrize("policy_loss,aggregation,critic,level", CASES)
def test_micro_batched_update_equals_whole_minibatch(policy_loss, aggregation, critic, level):
    algo = AlgoSection(policy_loss=policy_loss, aggregation=aggregation, entropy_coef=0.1, kl_coef=0.05,
                       dual_clip=3.0, clip_low=0.05, clip_high=0.05, behavior_weight_cap=2.0)
    models, params = models_and_params(critic, level)
    tx = optax.sgd(1.0)  # params move by the gradient itself (Adam's first step would hide its scale)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    batch, rows = random_batch(), jnp.asarray([6, 1, 0, 3, 7, 5])
    results = [jax.jit(make_update(models, algo, 0.8, tx, chunk=5, micro_batch_rows=m))(state, batch, rows)
               for m in (0, 2)]
    (whole, m_whole), (micro, m_micro) = results
    assert m_whole["clip_frac"] > 0 and m_whole["grad_norm"] > 0
    assert set(m_whole) == set(m_micro)
    for key in m_whole:
        np.testing.assert_allclose(m_micro[key], m_whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(micro.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_behavior_policy_picks_pi_old_and_weighs_steps():
    """recomputed: pi_old = the trainer's log-probs, weights = capped geometric-mean ratio of
    them to the sampler's; sampler: pi_old = the sampler's log-probs, weights 1."""
    rng = np.random.default_rng(0)
    batch = packed_batch(random_trajectories(rng, 6, 3, empty_frac=0), 3)
    shift = rng.normal(scale=0.5, size=batch.tokens.shape).astype(np.float32)
    logp = np.where(batch.action_mask, batch.old_logp + shift, 7.0).astype(np.float32)  # 7: off-action junk
    cap = 1.2
    new, weights, metrics = behavior_policy(batch, logp, algo=AlgoSection(behavior_weight_cap=cap))
    np.testing.assert_allclose(new.old_logp, np.where(batch.action_mask, logp, 0.0))
    want = np.ones((6, 3))
    for b in range(6):
        for k in range(3):
            on = batch.step_ids[b] == k
            if on.any():
                want[b, k] = min(np.exp(np.mean(shift[b][on])), cap)
    np.testing.assert_allclose(weights, want, rtol=1e-5)
    valid = batch.step_mask
    np.testing.assert_allclose(metrics["behavior/weight_mean"], want[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["behavior/weight_capped_frac"], np.mean(want[valid] == cap), rtol=1e-5)
    assert 0 < metrics["behavior/weight_capped_frac"] < 1
    same, ones, none = behavior_policy(batch, logp, algo=AlgoSection(behavior_logp="sampler"))
    np.testing.assert_array_equal(same.old_logp, batch.old_logp)
    np.testing.assert_array_equal(ones, np.ones((6, 3)))
    assert none == {}


def test_behavior_weights_scale_each_steps_policy_loss():
    mb = random_batch()
    logp = jnp.asarray(mb.old_logp) + 0.1
    zeros = jnp.zeros_like(logp)
    models = types.SimpleNamespace(critic_level=None)
    for policy_loss in ("step", "token"):
        off, on = (loss_terms(logp, zeros, zeros, mb._replace(behavior_weight_bs=np.full((B, S), 2.0, np.float32)),
                              models, AlgoSection(policy_loss=policy_loss, behavior_weight_cap=cap))[0]
                   for cap in (0.0, 3.0))
        np.testing.assert_allclose(on["policy_loss"][0], 2.0 * off["policy_loss"][0], rtol=1e-6)
        assert float(on["policy_loss"][1]) == float(off["policy_loss"][1])  # denominators unchanged


def test_micro_batched_scores_equal_whole_batch():
    models, params = models_and_params("shared", "step")
    ref = jax.tree.map(lambda x: x * 0.9, params["policy"])
    tokens = jnp.asarray(random_batch().tokens)
    segment_ids = jnp.asarray(np.repeat([[0] * 9 + [1] * 7], B, axis=0))
    run = lambda m: score(models, params, ref, tokens, segment_ids, temperature=0.8, with_ref=True,  # noqa: E731
                          chunk=6, micro_batch_rows=m)
    for x, y in zip(run(2), run(0)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    with pytest.raises(ValueError, match="micro-batches of 3"):
        run(3)


def test_no_full_logits_in_the_update():
    models, params = models_and_params("shared", "step")
    tx = optax.sgd(1.0)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    jaxpr = jax.make_jaxpr(make_update(models, AlgoSection(entropy_coef=0.1), 1.0, tx, chunk=4))(
        state, random_batch(), jnp.arange(B))

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else [p]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from shapes(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from shapes(sub)

    seen = list(shapes(jaxpr.jaxpr))
    assert (B, 4, V) in seen  # the chunks
    assert not [s for s in seen if len(s) == 3 and s[1:] == (T, V)]


@pytest.mark.slow
def test_micro_batching_on_sharded_meshes():
    env = subprocess_env(4)
    proc = subprocess.run([sys.executable, "-m", "tests.scripts.micro_batch_sharded"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL OK" in proc.stdout


def test_off_policy_steps_by_hand():
    """One trajectory: prompt p0 p1, step 0 = a0 a1 (sampler log-probs -1, -2), observation o0,
    step 1 = b0 (-0.5). The proximal policy (pi_old recomputed at update time) gives -0.8,
    -1.6 and -1.5: step weights min(exp((0.2 + 0.4) / 2), 1.25) = 1.25 (capped) and
    exp(-1.0). Dropping step 1 (too stale) leaves the policy loss of step 0 alone: the current
    policy 0.1 above pi_old on its tokens gives the step ratio exp(0.1), and with A_0 = 2 the
    loss is -2 exp(0.1) x 1.25 over one step (with step 1 kept: + 1 x exp(-1), over two)."""
    from steppo_jax.rollout import TrajectoryRecord, packed_batch as layout
    from steppo_jax.train.update import drop_steps

    rec = TrajectoryRecord(task_id=0, seed=0, group=0, terminated=True, live=False, rewards=[0.0, 1.0], anchors=[0, 0])
    rec.append_context([1, 2])
    rec.append_action([3, 4], [-1.0, -2.0], version=4)
    rec.append_context([5])
    rec.append_action([6], [-0.5], version=2)
    batch = layout([rec], 2, seq_len=8)
    prox = np.zeros((1, 8), np.float32)
    prox[0, 2:4], prox[0, 5] = [-0.8, -1.6], -1.5
    algo = AlgoSection(behavior_weight_cap=1.25)
    new, weights, metrics = behavior_policy(batch, prox, algo=algo)
    np.testing.assert_allclose(weights, [[1.25, np.exp(-1.0)]], rtol=1e-6)
    assert float(metrics["behavior/weight_capped_frac"]) == 0.5
    kept = np.asarray(drop_steps(batch, np.array([[False, True]])))
    assert kept.tolist() == [[-1, -1, 0, 0, -1, -1, -1, -1]]
    zeros = np.zeros((1, 8), np.float32)
    adv = np.where(batch.step_ids == 0, 2.0, np.where(batch.step_ids == 1, -1.0, 0.0)).astype(np.float32)
    logp = np.where(batch.step_ids == 0, prox + 0.1, prox).astype(np.float32)
    models = types.SimpleNamespace(critic_level=None)
    for step_ids, want, steps in ((kept, -2 * np.exp(0.1) * 1.25, 1),
                                  (batch.step_ids, -2 * np.exp(0.1) * 1.25 + np.exp(-1.0), 2)):
        mb = TrainBatch(tokens=batch.tokens, step_ids=step_ids, old_logp=new.old_logp, ref_logp=zeros, adv_bt=adv,
                        returns_bt=zeros, old_values_bt=zeros, value_pos=batch.value_pos, slot_mask=batch.slot_mask(),
                        returns_bs=np.zeros((1, 2), np.float32), behavior_weight_bs=weights, segment_ids=None)
        total, den = loss_terms(jnp.asarray(logp), zeros, zeros, mb, models, algo)[0]["policy_loss"]
        assert float(den) == steps
        np.testing.assert_allclose(float(total), want, rtol=1e-5)
