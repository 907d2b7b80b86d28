"""Loss kernels: values and gradients against the float64 reference and hand computation."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax import losses
from tests import reference as ref
from tests.step_data import packed_batch, random_trajectories


def policy_inputs(seed, S=4):
    rng = np.random.default_rng(seed)
    batch = packed_batch(random_trajectories(rng, 10, S), S, seed=seed)
    logp = (batch.old_logp + np.where(batch.action_mask, rng.normal(scale=0.15, size=batch.old_logp.shape), 0)).astype(np.float32)
    adv = rng.normal(size=(batch.batch_size, S)).astype(np.float32)
    return batch, logp, adv


@pytest.mark.parametrize("ratio", ["geometric", "product"])
@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("seed", range(3))
def test_step_policy_loss_value_and_grad(variant, ratio, aggregation, seed):
    batch, logp, adv = policy_inputs(seed)

    def loss(lp):
        (total, denom), _ = losses.step_policy_loss(lp, batch.old_logp, adv, batch.step_ids, clip_low=0.1,
                                                     clip_high=0.15, ratio=ratio, aggregation=aggregation)
        return total / denom, (total, denom)

    (value, (total, denom)), grad = variant(jax.value_and_grad(loss, has_aux=True))(logp)
    total_ref, denom_ref, grad_ref = ref.step_policy_loss(logp, batch.old_logp, adv, batch.step_ids, 0.1, 0.15,
                                                          ratio, aggregation)
    np.testing.assert_allclose(total, total_ref, rtol=1e-5, atol=1e-5)
    assert float(denom) == denom_ref
    np.testing.assert_allclose(grad, grad_ref, atol=1e-5)


def test_step_ratio_is_one_per_step_by_hand():
    # One step of two tokens: log-ratios +0.2 and -0.1 -> geometric ratio exp(0.05).
    logp = jnp.array([[0.0, -1.0, -2.0]])
    old = jnp.array([[0.0, -1.2, -1.9]])
    ids = jnp.array([[-1, 0, 0]])
    (total, denom), stats = losses.step_policy_loss(logp, old, jnp.array([[2.0]]), ids, clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(total, -2.0 * np.exp(0.05), rtol=1e-6)  # step mean of two equal token terms
    assert float(denom) == 1.0
    np.testing.assert_allclose(stats.ratios, [[np.exp(0.05)]], rtol=1e-6)
    (total, _), stats = losses.step_policy_loss(logp, old, jnp.array([[2.0]]), ids, clip_low=0.2, clip_high=0.02,
                                                ratio="product")
    np.testing.assert_allclose(total, -2.0 * 1.02, rtol=1e-6)  # exp(0.1) clipped at 1.02
    assert float(stats.clip_frac[0]) == 1.0


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("seed", range(2))
def test_step_policy_loss_dual_clip_and_weights_value_and_grad(variant, aggregation, seed):
    batch, logp, adv = policy_inputs(seed)
    logp = (logp + np.where(batch.action_mask, 0.6, 0)).astype(np.float32)  # ratios ~1.8: the cap binds
    weights = np.random.default_rng(seed).uniform(0.5, 2.0, adv.shape).astype(np.float32)

    def loss(lp):
        (total, denom), _ = losses.step_policy_loss(lp, batch.old_logp, adv, batch.step_ids, clip_low=0.1,
                                                     clip_high=0.15, dual_clip=1.5, aggregation=aggregation,
                                                     weights_bs=weights)
        return total / denom, (total, denom)

    (_, (total, denom)), grad = variant(jax.value_and_grad(loss, has_aux=True))(logp)
    total_ref, denom_ref, grad_ref = ref.step_policy_loss(logp, batch.old_logp, adv, batch.step_ids, 0.1, 0.15,
                                                          "geometric", aggregation, dual_clip=1.5, weights=weights)
    np.testing.assert_allclose(total, total_ref, rtol=1e-5, atol=1e-5)
    assert float(denom) == denom_ref
    np.testing.assert_allclose(grad, grad_ref, atol=1e-5)


def test_step_policy_loss_dual_clip_by_hand():
    # Three steps of two tokens each, both tokens at the step ratio:
    # step 0: s = 5, A = -1 -> max(5, clip(5) = 1.2) = 5, capped at 3 by dual_clip = 3.
    # step 1: s = 0.5, A = -1 -> max(0.5, 0.8) = 0.8 (below the cap).
    # step 2: s = 5, A = +1 -> max(-5, -1.2) = -1.2 (positive advantages are never capped).
    ratios = np.array([5.0, 5.0, 0.5, 0.5, 5.0, 5.0])
    logp = jnp.log(jnp.asarray(ratios[None], jnp.float32))
    old = jnp.zeros((1, 6))
    ids = jnp.array([[0, 0, 1, 1, 2, 2]])
    adv = jnp.array([[-1.0, -1.0, 1.0]])
    (total, denom), _ = losses.step_policy_loss(logp, old, adv, ids, clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(total, 5 + 0.8 - 1.2, rtol=1e-6)
    (total, denom), _ = losses.step_policy_loss(logp, old, adv, ids, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    np.testing.assert_allclose(total, 3 + 0.8 - 1.2, rtol=1e-6)
    assert float(denom) == 3
    grad = jax.grad(lambda lp: losses.step_policy_loss(lp, old, adv, ids, dual_clip=3.0)[0][0])(logp)
    np.testing.assert_allclose(grad[0, :2], 0.0)  # the capped step carries no gradient
    (total, _), _ = losses.step_policy_loss(logp, old, adv, ids, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                                            weights_bs=jnp.array([[0.5, 2.0, 1.0]]))
    np.testing.assert_allclose(total, 0.5 * 3 + 2.0 * 0.8 - 1.2, rtol=1e-6)


def test_behavior_weights_by_hand():
    # log pi_old - log pi_sampler per token: step 0 [0.2, 0.4] -> exp(0.3); step 1 [-0.5] ->
    # exp(-0.5); step 2 [1, 1, 1] -> e, capped at 2; slot 3 has no tokens -> 1.
    old = jnp.array([[0.0, -1.0, -1.0, 0.0, -2.0, -1.0, -1.0, -1.0]])
    sampler = jnp.array([[0.0, -1.2, -1.4, 0.0, -1.5, -2.0, -2.0, -2.0]])
    ids = jnp.array([[-1, 0, 0, -1, 1, 2, 2, 2]])
    w, (w_sum, n), (capped, n2) = losses.behavior_weights(old, sampler, ids, 4, cap=2.0)
    np.testing.assert_allclose(w, [[np.exp(0.3), np.exp(-0.5), 2.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(w_sum, np.exp(0.3) + np.exp(-0.5) + 2.0, rtol=1e-6)
    assert (float(n), float(capped), float(n2)) == (3.0, 1.0, 3.0)
    w, _, (capped, _) = losses.behavior_weights(old, sampler, ids, 4, cap=3.0)
    np.testing.assert_allclose(w[0, 2], np.e, rtol=1e-6)
    assert float(capped) == 0.0


def test_token_policy_loss_dual_clip_by_hand():
    logp = jnp.log(jnp.array([[1.0, 5.0, 0.5, 1.3]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -1.0, 1.0]])
    ids = jnp.array([[0, 0, 0, 0]])
    (total, denom), stats = losses.token_policy_loss(logp, old, adv, ids, clip_low=0.2, clip_high=0.2)
    # -1*1, max(5, 1.2)=5, max(0.5, 0.8)=0.8, max(-1.3, -1.2) = -1.2
    np.testing.assert_allclose(total, -1 + 5 + 0.8 - 1.2, rtol=1e-6)
    assert float(denom) == 4
    (total, _), _ = losses.token_policy_loss(logp, old, adv, ids, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    np.testing.assert_allclose(total, -1 + 3 + 0.8 - 1.2, rtol=1e-6)
    assert float(stats.clip_frac[0]) == 2.0  # the A<0, r>1.2 token is not clipped; the last two are


def test_aggregations_by_hand():
    loss = jnp.array([[1.0, 3.0, 0.0, 10.0, 0.0]])
    ids = jnp.array([[0, 0, -1, 1, -1]])
    assert tuple(map(float, losses.aggregate(loss, ids, 2, "token_mean"))) == (14.0, 3.0)
    assert tuple(map(float, losses.aggregate(loss, ids, 2, "step_mean_token_mean"))) == (12.0, 2.0)
    assert tuple(map(float, losses.aggregate(loss, ids, 2, "step_mean_token_sum"))) == (14.0, 2.0)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        losses.aggregate(loss, ids, 2, "mean")


def test_value_loss_by_hand(variant):
    v = jnp.array([[1.0, 3.0, 9.0]])
    old = jnp.array([[1.0, 1.0, 0.0]])
    ret = jnp.array([[2.0, 2.0, 0.0]])
    mask = jnp.array([[True, True, False]])
    total, n = variant(losses.value_loss)(v, old, ret, mask)
    assert (float(total), float(n)) == (1.0, 2.0)  # 0.5 * (1 + 1)
    total, _ = variant(losses.value_loss, clip=0.5)(v, old, ret, mask)
    # step 1: v clipped to 1.5 -> (1.5-2)^2 = 0.25 < (3-2)^2 = 1 -> max keeps 1.
    # step 0: v clipped to 1.0 (= v), error 1. Both 0.5 * 1.
    assert float(total) == 1.0
    v2 = jnp.array([[1.8, 1.8, 0.0]])
    total, _ = variant(losses.value_loss, clip=0.5)(v2, old, ret, mask)
    # clip(1.8, 0.5, 1.5) = 1.5 -> (1.5-2)^2 = 0.25 > (1.8-2)^2 = 0.04
    np.testing.assert_allclose(total, 0.5 * 0.25 * 2, rtol=1e-6)


def test_kl_estimators_by_hand():
    logp = jnp.array([-1.0, -2.0])
    ref_logp = jnp.array([-1.5, -1.0])
    x = np.array([0.5, -1.0])
    np.testing.assert_allclose(losses.kl_penalty(logp, ref_logp, "k1"), x, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref_logp, "k2"), 0.5 * x**2, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref_logp, "k3"), np.exp(-x) - 1 + x, rtol=1e-6)
    with pytest.raises(ValueError, match="k1"):
        losses.kl_penalty(logp, ref_logp, "k4")


def test_k3_is_unbiased_estimate_of_kl():
    rng = np.random.default_rng(0)
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.3, 0.3, 0.4])
    samples = rng.choice(3, size=200_000, p=p)
    est = losses.kl_penalty(jnp.log(p[samples]), jnp.log(q[samples]), "k3").mean()
    np.testing.assert_allclose(est, np.sum(p * np.log(p / q)), rtol=0.02)


def test_entropy_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]))
    np.testing.assert_allclose(losses.entropy(logits), [1.5 * np.log(2), 0.0], atol=1e-5)
