"""The estimator registry on StepBatches: packed == per-step rows, reference values, no recompiles."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax import credit
from steppo_jax.estimators import ESTIMATORS, EstimatorConfig, get_estimator
from steppo_jax.types import StepBatch, validate
from tests import reference as ref
from tests.step_data import packed_batch, random_trajectories, step_rows_batch

CFG = EstimatorConfig(gamma=0.95, lam=0.9)


def batches(seed, num=12, S=4, pack_len=None):
    """(packed, per-step rows, values [B, T] of packed, values of the per-step rows): the
    per-step rows packed into rows of ``pack_len`` tokens when given. Truncated trajectories
    end with a final observation (0-2 tokens), a final-state row of its own per-step."""
    rng = np.random.default_rng(seed)
    trajs = random_trajectories(rng, num, S)
    packed = validate(packed_batch(trajs, S, seed=seed))
    rows = validate(step_rows_batch(trajs, S, seed=seed, num_rows=sum(len(t.actions) + 1 for t in trajs) + 2,
                                    pack_len=pack_len))
    values = rng.normal(size=packed.tokens.shape).astype(np.float32)
    # A causal critic sees the same prefix in a per-step row (segment) as in the packed row.
    owners = {(r, slot + 1): rows.traj_index[r, slot] for r in range(rows.batch_size)
              for slot in range(rows.num_slots) if rows.traj_index[r, slot] >= 0}
    for i in np.flatnonzero(rows.bootstrap_row >= 0):
        r = rows.bootstrap_row[i]
        owners[(r, rows.segment_ids[r, rows.bootstrap_pos[i]] if pack_len else 1)] = i
    row_values = np.zeros(rows.tokens.shape, np.float32)
    for (r, seg), i in owners.items():
        where = np.flatnonzero(rows.segment_ids[r] == seg) if pack_len else np.arange(rows.seq_lens[r])
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


def truncated_example():
    """DESIGN §2's worked example cut after step 1 (not terminated), the final observation
    o2 o3 kept: p0 p1 p2 a0 a1 a2 o0 o1 b0 b1 o2 o3. Packed, and as per-step rows (one per
    row: step 0, step 1, the final state), with the values of a causal critic."""
    ids = np.array([-1, -1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1], np.int32)
    tokens = np.arange(1, 13, dtype=np.int32)
    values = np.array([0, 0, 0.5, 0, 0, 0, 0, 1.0, 0, 9.0, 0, 2.0], np.float32)  # 9: the last action token
    grid = dict(step_rewards=np.array([[0.0, 1.0]], np.float32), step_mask=np.ones((1, 2), bool),
                anchor_ids=np.zeros((1, 2), np.int32), terminated=np.array([False]), group_ids=np.zeros(1, np.int32))
    packed = StepBatch(tokens=tokens[None], action_mask=ids[None] >= 0, step_ids=ids[None],
                       seq_lens=np.array([12], np.int32), value_pos=np.array([[2, 7]], np.int32),
                       old_logp=np.zeros((1, 12), np.float32), ref_logp=np.zeros((1, 12), np.float32), **grid)
    lens = np.array([6, 10, 12], np.int32)
    real = np.arange(12)[None] < lens[:, None]
    row_ids = np.where(real, np.stack([np.where(ids == 0, 0, -1), np.where(ids == 1, 0, -1), -np.ones(12)]), -1)
    rows = StepBatch(tokens=np.where(real, tokens, 0).astype(np.int32), action_mask=row_ids >= 0,
                     step_ids=row_ids.astype(np.int32), seq_lens=lens, value_pos=np.array([[2], [7], [0]], np.int32),
                     old_logp=np.zeros((3, 12), np.float32), ref_logp=np.zeros((3, 12), np.float32),
                     traj_index=np.array([[0], [0], [-1]], np.int32), step_index=np.array([[0], [1], [-1]], np.int32),
                     bootstrap_row=np.array([2], np.int32), bootstrap_pos=np.array([11], np.int32), **grid)
    return validate(packed), validate(rows), values[None], np.where(real, values, 0).astype(np.float32)


def test_step_gae_of_a_truncated_trajectory_by_hand():
    # gamma 0.9, lambda 0.8; V(s0) = V[2] = 0.5, V(s1) = V[7] = 1, V(s2) = V[11] = 2 (the final
    # state, not the last action token's 9): A1 = 1 + 0.9*2 - 1 = 1.8;
    # A0 = (0 + 0.9*1 - 0.5) + 0.9*0.8*1.8 = 1.696; R = A + V = (2.196, 2.8).
    cfg = EstimatorConfig(gamma=0.9, lam=0.8, whiten=False)
    packed, rows, values, row_values = truncated_example()
    out = get_estimator("step_gae").fn(packed, values, cfg)
    np.testing.assert_allclose(out.returns_bs, [[2.196, 2.8]], rtol=1e-6)
    np.testing.assert_allclose(out.advantages_bt[0, [3, 4, 5, 8, 9]], [1.696] * 3 + [1.8] * 2, rtol=1e-6)
    out_rows = get_estimator("step_gae").fn(rows, row_values, cfg)
    np.testing.assert_allclose(rows.to_grid(out_rows.returns_bs), [[2.196, 2.8]], rtol=1e-6)
    np.testing.assert_allclose(out_rows.advantages_bt[0, 3:6], [1.696] * 3, rtol=1e-6)
    np.testing.assert_allclose(out_rows.advantages_bt[1, 8:10], [1.8] * 2, rtol=1e-6)
