"""The estimator registry on StepBatches: packed == per-step rows, reference values, no recompiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax import credit
from steppo_jax.estimators import ESTIMATORS, EstimatorConfig, get_estimator
from steppo_jax.types import validate
from tests import reference as ref
from tests.step_data import packed_batch, random_trajectories, step_rows_batch

CFG = EstimatorConfig(gamma=0.95, lam=0.9)


def batches(seed, num=12, S=4, pack_len=None):
    """(packed, per-step rows, values [B, T] of packed, values of the per-step rows): the
    per-step rows packed into rows of ``pack_len`` tokens when given."""
    rng = np.random.default_rng(seed)
    trajs = random_trajectories(rng, num, S, final_obs=False)
    packed = validate(packed_batch(trajs, S, seed=seed))
    rows = validate(step_rows_batch(trajs, S, seed=seed, num_rows=sum(len(t.actions) for t in trajs) + 2,
                                    pack_len=pack_len))
    values = rng.normal(size=packed.tokens.shape).astype(np.float32)
    # A causal critic sees the same prefix in a per-step row (segment) as in the packed row.
    row_values = np.zeros(rows.tokens.shape, np.float32)
    for r in range(rows.batch_size):
        for slot in range(rows.num_slots):
            i = rows.traj_index[r, slot]
            if i >= 0:
                where = np.flatnonzero(rows.segment_ids[r] == slot + 1) if pack_len else np.arange(rows.seq_lens[r])
                row_values[r, where] = values[i, :where.size]
    return packed, rows, values, row_values


def per_trajectory(batch, adv_bt):
    """{(traj, step): advantage} read off the action tokens of any layout."""
    out = {}
    for b in range(batch.batch_size):
        for t in range(batch.seq_len):
            slot = batch.step_ids[b, t]
            if slot < 0:
                continue
            key = (b, slot) if batch.packed else (int(batch.traj_index[b, slot]), int(batch.step_index[b, slot]))
            out.setdefault(key, set()).add(round(float(adv_bt[b, t]), 4))
    return out


@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - {"token_gae"}))
@pytest.mark.parametrize("seed, pack_len", [(0, None), (1, None), (2, None), (0, 24), (1, 24), (2, 40)])
def test_packed_rows_and_per_step_rows_agree(name, seed, pack_len):
    """Packed trajectories == per-step rows == per-step rows packed several to a row."""
    packed, rows, values, row_values = batches(seed, pack_len=pack_len)
    if pack_len:
        assert rows.num_slots > 1
    est = get_estimator(name)
    fn = jax.jit(est.fn, static_argnums=2)
    a = per_trajectory(packed, fn(packed, values, CFG).advantages_bt)
    b = per_trajectory(rows, fn(rows, row_values, CFG).advantages_bt)
    assert a == b
    assert all(len(v) == 1 for v in a.values()), "a step's tokens must share one advantage"


@pytest.mark.parametrize("seed", range(3))
def test_step_gae_estimator_matches_reference(seed):
    packed, _, values, _ = batches(seed)
    out = get_estimator("step_gae").fn(packed, values, CFG)
    v_bs = np.take_along_axis(values, packed.value_pos, axis=1)
    boot = np.where(packed.terminated, 0.0, values[np.arange(packed.batch_size), np.maximum(packed.seq_lens - 1, 0)])
    adv, ret = ref.step_gae(packed.step_rewards, v_bs, packed.step_mask, boot, CFG.gamma, CFG.lam)
    np.testing.assert_allclose(out.advantages_bt, ref.to_tokens(ref.whiten(adv, packed.step_mask), packed.step_ids), atol=1e-5)
    np.testing.assert_allclose(out.returns_bs, ret, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_token_gae_estimator_matches_reference(seed):
    packed, rows, values, _ = batches(seed)
    out = get_estimator("token_gae").fn(packed, values, CFG)
    last = np.zeros(packed.tokens.shape, bool)
    for b in range(packed.batch_size):
        for k in range(packed.num_steps):
            pos = np.nonzero(packed.step_ids[b] == k)[0]
            if pos.size:
                last[b, pos[-1]] = True
    r_bt = np.where(last, ref.to_tokens(packed.step_rewards, packed.step_ids), 0)
    v_state = np.concatenate([values[:, :1], values[:, :-1]], axis=1)
    boot = np.where(packed.terminated, 0.0, values[np.arange(packed.batch_size), np.maximum(packed.seq_lens - 1, 0)])
    adv, ret = ref.token_gae(r_bt, v_state, packed.action_mask, CFG.gamma, CFG.lam, boot)
    np.testing.assert_allclose(out.advantages_bt, ref.whiten(adv, packed.action_mask), atol=1e-5)
    np.testing.assert_allclose(out.returns_bt, ret, atol=1e-5)
    with pytest.raises(ValueError, match="packed layout"):
        get_estimator("token_gae").fn(rows, values, CFG)


@pytest.mark.parametrize("seed", range(2))
def test_group_estimators_match_reference(seed):
    packed, _, values, _ = batches(seed)
    scores = np.array([packed.step_rewards[b, packed.step_mask[b]].sum() for b in range(packed.batch_size)])
    gids = np.where(packed.step_mask.any(1), packed.group_ids, -1)
    N = packed.num_traj
    expected = {
        "grpo": ref.to_tokens(np.repeat(ref.grpo(scores, gids, N)[:, None], packed.num_steps, 1), packed.step_ids),
        "rloo": ref.to_tokens(np.repeat(ref.rloo(scores, gids, N)[:, None], packed.num_steps, 1), packed.step_ids),
        "reinforce_pp": ref.reinforce_pp(scores, gids, packed.action_mask, N),
        "gigpo": ref.to_tokens(ref.gigpo(packed.step_rewards, packed.step_mask, gids, packed.anchor_ids, CFG.gamma),
                               packed.step_ids),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(get_estimator(name).fn(packed, None, CFG).advantages_bt, want, atol=1e-4, err_msg=name)


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="step_gae"):
        get_estimator("ppo_magic")


def test_no_recompile_within_a_bucket():
    """Batches of the same (B, S, T) bucket reuse one executable for every estimator and loss."""
    from steppo_jax import losses

    def step(batch, values):
        outs = {name: est.fn(batch, values, CFG).advantages_bt for name, est in ESTIMATORS.items()}
        adv_bs = credit.step_sums(outs["step_gae"], batch.step_ids, batch.num_slots)
        (pl, _), _ = losses.step_policy_loss(batch.old_logp * 0.9, batch.old_logp, adv_bs, batch.step_ids)
        return outs, pl

    jitted = jax.jit(step)
    sizes = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        batch = packed_batch(random_trajectories(rng, 8, 4), 4, seq_len=64, seed=seed)
        values = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
        jax.block_until_ready(jitted(batch, values))
        sizes.append(jitted._cache_size())
    assert sizes == [1, 1, 1, 1]
    other_bucket = packed_batch(random_trajectories(np.random.default_rng(9), 8, 4), 4, seq_len=128)
    jax.block_until_ready(jitted(other_bucket, jnp.zeros((8, 128), jnp.float32)))
    assert jitted._cache_size() == 2  # the counter does count a new bucket
