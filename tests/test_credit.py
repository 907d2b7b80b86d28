"""Credit kernels against hand-computed values and the float64 reference, with and without jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax import credit
from tests import reference as ref
from tests.step_data import packed_batch, random_trajectories

ATOL = 1e-5


def ragged(seed, num=13, S=5):
    rng = np.random.default_rng(seed)
    batch = packed_batch(random_trajectories(rng, num, S), S, seed=seed)
    values = rng.normal(size=batch.tokens.shape).astype(np.float32)
    return rng, batch, values


# ---- hand-computed values -------------------------------------------------------------

def test_step_gae_by_hand(variant):
    # delta_1 = 2 + 0.9*0 - 1 = 1; A_1 = 1; delta_0 = 1 + 0.9*1 - 0.5 = 1.4; A_0 = 1.4 + 0.72*1.
    r = jnp.array([[1.0, 2.0, 0.0]])
    v = jnp.array([[0.5, 1.0, 7.0]])
    m = jnp.array([[True, True, False]])
    adv, ret = variant(credit.step_gae, gamma=0.9, lam=0.8)(r, v, m, jnp.zeros(1))
    np.testing.assert_allclose(adv, [[2.12, 1.0, 0.0]], atol=ATOL)
    np.testing.assert_allclose(ret, [[2.62, 2.0, 0.0]], atol=ATOL)
    # truncated: bootstrap V = 3 after the last step: delta_1 = 2 + 0.9*3 - 1 = 3.7.
    adv, _ = variant(credit.step_gae, gamma=0.9, lam=0.8)(r, v, m, jnp.array([3.0]))
    np.testing.assert_allclose(adv, [[1.4 + 0.72 * 3.7, 3.7, 0.0]], atol=ATOL)


def test_token_gae_by_hand_skips_observations(variant):
    # Worked example of DESIGN §2: actions at 3,4,5 and 8,9; rewards on the last tokens.
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]], bool)
    r = jnp.zeros((1, 12)).at[0, 5].set(1.0).at[0, 9].set(2.0)
    v = jnp.zeros((1, 12)).at[0, 3].set(0.5).at[0, 8].set(1.0)
    adv, ret = variant(credit.token_gae, gamma=1.0, lam=1.0)(r, v, mask)
    expected = np.zeros(12)
    expected[[3, 4, 5, 8, 9]] = [3 - 0.5, 3, 3, 2 - 1.0, 2]
    np.testing.assert_allclose(adv[0], expected, atol=ATOL)
    np.testing.assert_allclose(ret[0], np.where(mask[0], 3.0 * (np.arange(12) < 6) + 2.0 * (np.arange(12) >= 6), 0), atol=ATOL)


def test_step_sums_and_broadcast_by_hand(variant):
    ids = jnp.array([[-1, -1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1]])
    x = jnp.arange(12, dtype=jnp.float32)[None]
    sums = variant(credit.step_sums, num_steps=3)(x, ids)
    np.testing.assert_allclose(sums, [[12.0, 17.0, 0.0]])
    back = variant(credit.to_tokens)(jnp.array([[1.0, 2.0, 3.0]]), ids)
    np.testing.assert_allclose(back, [[0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0]])


def test_discounted_returns_by_hand(variant):
    g = variant(credit.discounted_returns, gamma=0.5)(jnp.array([[1.0, 2.0, 4.0, 9.0]]), jnp.array([[1, 1, 1, 0]], bool))
    np.testing.assert_allclose(g, [[1 + 1 + 1, 2 + 2, 4, 0]], atol=ATOL)


def test_group_estimators_by_hand(variant):
    scores = jnp.array([1.0, 3.0, 2.0, 5.0, 0.0])
    groups = jnp.array([0, 0, 1, 2, -1])  # group 1 and 2 are singletons, row 4 is padding
    grpo = variant(credit.grpo_advantages, num_groups=3)(scores, groups)
    s = np.std([1.0, 3.0], ddof=1)
    np.testing.assert_allclose(grpo, [-1 / (s + 1e-6), 1 / (s + 1e-6), 2 / (1 + 1e-6), 5 / (1 + 1e-6), 0], atol=ATOL)
    dr = variant(credit.grpo_advantages, num_groups=3, scale_by_std=False)(scores, groups)
    np.testing.assert_allclose(dr, [-1, 1, 2, 5, 0], atol=ATOL)
    rloo = variant(credit.rloo_advantages, num_groups=3)(scores, groups)
    np.testing.assert_allclose(rloo, [-2, 2, 2, 5, 0], atol=ATOL)


def test_zero_variance_group_gets_zero(variant):
    adv = variant(credit.grpo_advantages, num_groups=1)(jnp.array([1.0, 1.0, 1.0]), jnp.zeros(3, jnp.int32))
    np.testing.assert_array_equal(adv, np.zeros(3))


def test_whiten_by_hand(variant):
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    m = jnp.array([True, True, True, False])
    np.testing.assert_allclose(variant(credit.whiten)(x, m), [-1, 0, 1, 0], atol=ATOL)  # std(ddof=1) = 1
    np.testing.assert_array_equal(variant(credit.whiten)(x, jnp.zeros(4, bool)), np.zeros(4))
    np.testing.assert_array_equal(variant(credit.whiten)(x, jnp.array([0, 1, 0, 0], bool)), np.zeros(4))
    # a std below the floor divides by the floor: small spreads stay small
    np.testing.assert_allclose(variant(credit.whiten, std_floor=4.0)(x, m), [-0.25, 0, 0.25, 0], atol=ATOL)
    np.testing.assert_allclose(variant(credit.whiten, std_floor=0.5)(x, m), [-1, 0, 1, 0], atol=ATOL)
    rows = variant(credit.whiten_rows, std_floor=4.0)(jnp.array([1.0, 3.0]), jnp.array([2, 2]), jnp.ones((2, 2), bool))
    np.testing.assert_allclose(rows, credit.whiten(jnp.array([1.0, 1, 3, 3]), jnp.ones(4, bool), std_floor=4.0
                                                   ).reshape(2, 2), atol=ATOL)


def test_gigpo_by_hand(variant):
    # Two rollouts of one task; both start in anchor 7; rollout 0 then visits anchor 8.
    r = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    m = jnp.array([[True, True], [True, False]])
    adv = variant(credit.gigpo_advantages, gamma=1.0)(r, m, jnp.array([0, 0]), jnp.array([[7, 8], [7, 9]]))
    s = np.std([1.0, 0.0], ddof=1)
    ep = np.array([0.5, -0.5]) / (s + 1e-6)
    # step 0 of both share (group 0, anchor 7): returns 1 and 0; step 1 of row 0 is alone.
    np.testing.assert_allclose(adv, [[ep[0] + 0.5 / (s + 1e-6), ep[0]], [ep[1] - 0.5 / (s + 1e-6), 0]], atol=1e-4)


# ---- random ragged batches against the float64 reference ---------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_step_kernels_match_reference(variant, seed):
    rng, batch, values = ragged(seed)
    S = batch.num_steps
    x = rng.normal(size=batch.tokens.shape).astype(np.float32)
    np.testing.assert_allclose(variant(credit.step_sums, num_steps=S)(x, batch.step_ids),
                               ref.step_sums(x, batch.step_ids, S), atol=ATOL)
    x_bs = rng.normal(size=(batch.batch_size, S)).astype(np.float32)
    np.testing.assert_allclose(variant(credit.to_tokens)(x_bs, batch.step_ids), ref.to_tokens(x_bs, batch.step_ids), atol=ATOL)
    v_bs = rng.normal(size=(batch.batch_size, S)).astype(np.float32)
    boot = np.where(batch.terminated, 0, rng.normal(size=batch.batch_size)).astype(np.float32)
    adv, ret = variant(credit.step_gae, gamma=0.95, lam=0.9)(batch.step_rewards, v_bs, batch.step_mask, boot)
    adv_ref, ret_ref = ref.step_gae(batch.step_rewards, v_bs, batch.step_mask, boot, 0.95, 0.9)
    np.testing.assert_allclose(adv, adv_ref, atol=ATOL)
    np.testing.assert_allclose(ret, ret_ref, atol=ATOL)
    np.testing.assert_allclose(variant(credit.discounted_returns, gamma=0.9)(batch.step_rewards, batch.step_mask),
                               ref.discounted(batch.step_rewards, batch.step_mask, 0.9), atol=ATOL)
    np.testing.assert_allclose(variant(credit.whiten)(adv, batch.step_mask), ref.whiten(adv_ref, batch.step_mask), atol=ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_token_gae_matches_reference(variant, seed):
    rng, batch, values = ragged(seed)
    r = rng.normal(size=values.shape).astype(np.float32)
    boot = rng.normal(size=batch.batch_size).astype(np.float32)
    adv, ret = variant(credit.token_gae, gamma=0.97, lam=0.9)(r, values, batch.action_mask, bootstrap_b=boot)
    adv_ref, ret_ref = ref.token_gae(r, values, batch.action_mask, 0.97, 0.9, boot)
    np.testing.assert_allclose(adv, adv_ref, atol=ATOL)
    np.testing.assert_allclose(ret, ret_ref, atol=ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_group_kernels_match_reference(variant, seed):
    rng = np.random.default_rng(seed)
    B, G = 17, 6  # some groups empty, some singletons
    scores = rng.choice([0.0, 1.0, 2.5], size=B).astype(np.float32)
    gids = rng.integers(-1, G, size=B).astype(np.int32)
    for scale in (True, False):
        np.testing.assert_allclose(variant(credit.grpo_advantages, num_groups=G, scale_by_std=scale)(scores, gids),
                                   ref.grpo(scores, gids, G, scale_by_std=scale), atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(variant(credit.rloo_advantages, num_groups=G)(scores, gids), ref.rloo(scores, gids, G), atol=ATOL)
    mask = rng.random((B, 9)) < 0.5
    np.testing.assert_allclose(variant(credit.reinforce_pp_advantages, num_groups=G)(scores, gids, mask),
                               ref.reinforce_pp(scores, gids, mask, G), atol=ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_gigpo_matches_reference(variant, seed):
    _, batch, _ = ragged(seed, num=16, S=4)
    adv = variant(credit.gigpo_advantages, gamma=0.9, step_weight=0.7)(
        batch.step_rewards, batch.step_mask, batch.group_ids, batch.anchor_ids)
    expected = ref.gigpo(batch.step_rewards, batch.step_mask, batch.group_ids, batch.anchor_ids, 0.9, 0.7)
    np.testing.assert_allclose(adv, expected, atol=1e-4, rtol=1e-5)


# ---- equivalences and edge cases ---------------------------------------------------------

def test_token_gae_is_step_gae_with_one_token_per_step(variant):
    rng = np.random.default_rng(3)
    B, T = 6, 14
    mask = rng.random((B, T)) < 0.5
    mask[:, 0] = False  # a prompt token before the first action
    step_ids = np.where(mask, np.cumsum(mask, axis=1) - 1, -1)
    S = int(mask.sum(1).max())
    values_bt = rng.normal(size=(B, T)).astype(np.float32)  # V of the state before token t
    r_bt = np.where(mask, rng.normal(size=(B, T)), 0).astype(np.float32)
    boot = rng.normal(size=B).astype(np.float32)
    adv_t, ret_t = variant(credit.token_gae, gamma=0.9, lam=0.7)(r_bt, values_bt, mask, bootstrap_b=boot)
    r_bs = ref.step_sums(r_bt, step_ids, S).astype(np.float32)
    v_bs = ref.step_sums(values_bt, step_ids, S).astype(np.float32)
    step_mask = np.arange(S)[None] < mask.sum(1)[:, None]
    adv_s, ret_s = variant(credit.step_gae, gamma=0.9, lam=0.7)(r_bs, v_bs, step_mask, boot)
    np.testing.assert_allclose(adv_t, credit.to_tokens(adv_s, step_ids), atol=ATOL)
    np.testing.assert_allclose(ret_t, credit.to_tokens(ret_s, step_ids), atol=ATOL)


def test_all_masked_rows_and_singletons_are_finite(variant):
    B, S, T = 4, 3, 8
    zeros_bs = jnp.zeros((B, S))
    no_steps = jnp.zeros((B, S), bool)
    adv, ret = variant(credit.step_gae, gamma=1.0, lam=1.0)(zeros_bs, zeros_bs, no_steps, jnp.zeros(B))
    outs = [adv, ret, variant(credit.whiten)(adv, no_steps),
            variant(credit.token_gae, gamma=1.0, lam=1.0)(jnp.zeros((B, T)), jnp.zeros((B, T)), jnp.zeros((B, T), bool))[0],
            variant(credit.grpo_advantages, num_groups=B)(jnp.ones(B), jnp.arange(B)),
            variant(credit.rloo_advantages, num_groups=B)(jnp.ones(B), jnp.arange(B)),
            variant(credit.reinforce_pp_advantages, num_groups=B)(jnp.ones(B), jnp.arange(B), jnp.zeros((B, T), bool)),
            variant(credit.gigpo_advantages, gamma=1.0)(zeros_bs, no_steps, jnp.arange(B), jnp.zeros((B, S), jnp.int32))]
    for out in outs:
        assert np.all(np.isfinite(out)), out
    np.testing.assert_array_equal(outs[0], 0)
    np.testing.assert_array_equal(outs[-1], 0)


def test_token_gae_long_rows_match_reference():
    rng = np.random.default_rng(7)
    mask = rng.random((4, 300)) < 0.7
    r = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    v = rng.normal(size=mask.shape).astype(np.float32)
    adv, ret = jax.jit(functools.partial(credit.token_gae, gamma=0.99, lam=0.95))(r, v, mask)
    adv_ref, ret_ref = ref.token_gae(r, v, mask, 0.99, 0.95)
    np.testing.assert_allclose(adv, adv_ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, atol=1e-4, rtol=1e-5)
