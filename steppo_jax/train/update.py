"""The device side of an RL iteration: scoring passes, credit, and the PPO update.

All functions are pure and jitted with static model definitions and config sections;
``Trainer`` (train/rl.py) places the arrays on the mesh and calls them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from steppo_jax import credit, losses
from steppo_jax.estimators import EstimatorConfig, get_estimator
from steppo_jax.models import token_logprobs
from steppo_jax.sharding import constrain
from steppo_jax.train.config import AlgoSection
from steppo_jax.train.state import Models, TrainState
from steppo_jax.types import StepBatch


class TrainBatch(NamedTuple):
    """Row-major arrays of one update (every leaf has the batch dimension B first).

    tokens, step_ids, old_logp, ref_logp, adv_bt, returns_bt, old_values_bt: [B, T];
    value_pos, slot_mask, returns_bs: [B, S_row]; segment_ids: [B, T] or None.
    """

    tokens: jax.Array
    step_ids: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    adv_bt: jax.Array
    returns_bt: jax.Array
    old_values_bt: jax.Array
    value_pos: jax.Array
    slot_mask: jax.Array
    returns_bs: jax.Array
    segment_ids: jax.Array | None


def _policy(models: Models, policy_params, tokens, segment_ids, temperature: float):
    """(log-probs [B, T], logits [B, T, V], final hidden states [B, T, D])."""
    policy = nnx.merge(models.policy_def, policy_params)
    h = policy.hidden(tokens, segment_ids=segment_ids)
    logits = policy.logits(h)
    return token_logprobs(logits, tokens, temperature), logits, h


def forward(models: Models, params, tokens, segment_ids, temperature: float):
    """Log-probs [B, T], entropies [B, T] (of the distribution each token was drawn from)
    and critic values [B, T] (zeros without a critic) of a batch."""
    logp, logits, h = _policy(models, params["policy"], tokens, segment_ids, temperature)
    ent = losses.entropy(logits / temperature)
    ent = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent[:, :-1]], axis=1)
    if models.critic == "shared":
        values = nnx.merge(models.critic_def, params["critic"])(h)
    elif models.critic == "separate":
        values = nnx.merge(models.critic_def, params["critic"])(tokens, segment_ids=segment_ids)
    else:
        values = jnp.zeros(tokens.shape, jnp.float32)
    return logp, ent, values


@functools.partial(jax.jit, static_argnames=("models", "temperature", "with_ref"))
def score(models: Models, params, ref_params, tokens, segment_ids, *, temperature: float, with_ref: bool):
    """Behaviour log-probs, reference log-probs (zeros unless ``with_ref``) and values [B, T]."""
    logp, _, values = forward(models, params, tokens, segment_ids, temperature)
    if with_ref:
        ref_logp = _policy(models, ref_params, tokens, segment_ids, temperature)[0]
    else:
        ref_logp = jnp.zeros_like(logp)
    return logp, ref_logp, values


def estimator_config(algo: AlgoSection) -> EstimatorConfig:
    return EstimatorConfig(gamma=algo.gamma, lam=algo.lam, whiten=algo.whiten, scale_by_std=algo.scale_by_std,
                           step_weight=algo.step_weight)


@functools.partial(jax.jit, static_argnames=("algo",))
def assign_credit(batch: StepBatch, values_bt, *, algo: AlgoSection):
    """Runs the configured estimator on the whole batch; KL folded into rewards if asked.

    Returns (Credit, step rewards used [N, S])."""
    rewards = batch.step_rewards
    if algo.kl_coef and algo.kl_in_reward:
        kl_bt = jnp.where(batch.action_mask, losses.kl_penalty(batch.old_logp, batch.ref_logp, algo.kl_kind), 0.0)
        kl_bs = batch.to_grid(credit.step_sums(kl_bt, batch.step_ids, batch.num_slots))
        rewards = jnp.where(batch.step_mask, rewards - algo.kl_coef * kl_bs, 0.0)
        batch = batch.replace(step_rewards=rewards)
    est = get_estimator(algo.estimator)
    return est.fn(batch, values_bt, estimator_config(algo)), rewards


def take_rows(batch: TrainBatch, rows: jax.Array) -> TrainBatch:
    """The minibatch of ``rows`` [M] (a global row index, the same on every process): every
    leaf [B, ...] -> [M, ...], batch-sharded. A cross-row gather, so it reads replicated copies."""
    def take(x):
        return constrain(credit.replicated(x)[rows], ("batch",) + (None,) * (x.ndim - 1))
    return jax.tree.map(take, batch)


def loss_fn(params, mb: TrainBatch, models: Models, algo: AlgoSection, temperature: float):
    """Policy loss + value_coef * value loss (+ KL, - entropy bonus) and metrics."""
    logp, ent, values = forward(models, params, mb.tokens, mb.segment_ids, temperature)
    S = mb.value_pos.shape[1]
    if algo.policy_loss == "step":
        counts = credit.step_counts(mb.step_ids, S)
        adv_bs = credit.step_sums(mb.adv_bt, mb.step_ids, S) / jnp.maximum(counts, 1)
        (p_sum, p_den), stats = losses.step_policy_loss(logp, mb.old_logp, adv_bs, mb.step_ids,
                                                         clip_low=algo.clip_low, clip_high=algo.clip_high,
                                                         ratio=algo.ratio, aggregation=algo.aggregation)
    else:
        (p_sum, p_den), stats = losses.token_policy_loss(logp, mb.old_logp, mb.adv_bt, mb.step_ids,
                                                          clip_low=algo.clip_low, clip_high=algo.clip_high,
                                                          dual_clip=algo.dual_clip, aggregation=algo.aggregation,
                                                          num_steps=S)
    policy_loss = p_sum / jnp.maximum(p_den, 1)
    total = policy_loss
    metrics = {"policy_loss": policy_loss, "clip_frac": stats.clip_frac[0] / jnp.maximum(stats.clip_frac[1], 1),
               "approx_kl": stats.approx_kl[0] / jnp.maximum(stats.approx_kl[1], 1),
               "ratio_mean": stats.ratio_mean[0] / jnp.maximum(stats.ratio_mean[1], 1),
               "ratio_max": stats.ratio_max, "ratio_min": stats.ratio_min}
    if models.critic_level == "step":
        v = credit.read_at(values, mb.value_pos)
        v_old = credit.read_at(mb.old_values_bt, mb.value_pos)
        v_sum, v_den = losses.value_loss(v, v_old, mb.returns_bs, mb.slot_mask, clip=algo.value_clip)
    elif models.critic_level == "token":
        shift = lambda x: jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)  # noqa: E731  V before token t
        v_sum, v_den = losses.value_loss(shift(values), shift(mb.old_values_bt), mb.returns_bt, mb.step_ids >= 0,
                                         clip=algo.value_clip)
    else:
        v_sum, v_den = jnp.zeros(()), jnp.ones(())
    value_loss = v_sum / jnp.maximum(v_den, 1)
    total = total + algo.value_coef * value_loss
    e_sum, e_den = losses.aggregate(ent, mb.step_ids, S, algo.aggregation)
    entropy = e_sum / jnp.maximum(e_den, 1)
    total = total - algo.entropy_coef * entropy
    if algo.kl_coef:  # there is a reference policy only when KL is used
        kl_bt = losses.kl_penalty(logp, mb.ref_logp, algo.kl_kind)
        k_sum, k_den = losses.aggregate(kl_bt, mb.step_ids, S, algo.aggregation)
        metrics["kl_ref"] = k_sum / jnp.maximum(k_den, 1)
        if not algo.kl_in_reward:
            total = total + algo.kl_coef * metrics["kl_ref"]
    metrics |= {"value_loss": value_loss, "entropy": entropy, "loss": total}
    return total, metrics


def make_update(models: Models, algo: AlgoSection, temperature: float, tx: optax.GradientTransformation):
    """update(state, batch, rows) -> (state, metrics): one step on the minibatch ``rows`` [M]
    of ``batch`` (see ``take_rows``); jit it with donation of the state."""

    def update(state: TrainState, batch: TrainBatch, rows: jax.Array):
        mb = take_rows(batch, rows)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb, models, algo, temperature)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["skipped"] = 1.0 - jnp.isfinite(metrics["loss"] + metrics["grad_norm"]).astype(jnp.float32)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return update
