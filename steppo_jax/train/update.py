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
from steppo_jax.models import token_logprobs_and_entropy
from steppo_jax.sharding import constrain
from steppo_jax.train.config import AlgoSection
from steppo_jax.train.state import Models, TrainState
from steppo_jax.types import StepBatch


class TrainBatch(NamedTuple):
    """Row-major arrays of one update (every leaf has the batch dimension B first).

    tokens, step_ids, old_logp, ref_logp, adv_bt, returns_bt, old_values_bt: [B, T];
    value_pos, slot_mask, returns_bs: [B, S_row]; behavior_weight_bs: [B, S_row] each step's
    truncated importance weight (``behavior_policy``; used with ``algo.behavior_weight_cap``);
    segment_ids: [B, T] or None. ``old_logp`` is pi_old of the ratios (``algo.behavior_logp``).
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
    behavior_weight_bs: jax.Array
    segment_ids: jax.Array | None


def _policy(models: Models, policy_params, tokens, segment_ids, temperature: float, chunk: int,
            with_entropy: bool = True):
    """(log-probs [B, T], entropies [B, T] or None, final hidden states [B, T, D]), the LM head
    applied ``chunk`` tokens at a time (never [B, T, V] logits)."""
    policy = nnx.merge(models.policy_def, policy_params)
    h = policy.hidden(tokens, segment_ids=segment_ids)
    logp, ent = token_logprobs_and_entropy(h, policy.lm_weight(h.dtype), tokens, temperature, chunk=chunk,
                                           with_entropy=with_entropy)
    return logp, ent, h


def forward(models: Models, params, tokens, segment_ids, temperature: float, chunk: int, with_entropy: bool = True):
    """Log-probs [B, T], entropies [B, T] (of the distribution each token was drawn from; None
    without ``with_entropy``) and critic values [B, T] (zeros without a critic) of a batch."""
    logp, ent, h = _policy(models, params["policy"], tokens, segment_ids, temperature, chunk, with_entropy)
    if models.critic == "shared":
        values = nnx.merge(models.critic_def, params["critic"])(h)
    elif models.critic == "separate":
        values = nnx.merge(models.critic_def, params["critic"])(tokens, segment_ids=segment_ids)
    else:
        values = jnp.zeros(tokens.shape, jnp.float32)
    return logp, ent, values


def take_rows(batch, rows: jax.Array):
    """The minibatch of ``rows`` [M] (a global row index, the same on every process) of a
    ``TrainBatch`` or any pytree of rows: every leaf [B, ...] -> [M, ...], batch-sharded. A
    cross-row gather, so it reads replicated copies."""
    def take(x):
        return constrain(credit.replicated(x)[rows], ("batch",) + (None,) * (x.ndim - 1))
    return jax.tree.map(take, batch)


def row_blocks(rows: int, micro_batch_rows: int) -> jax.Array:
    """Row ids [rows // m, m] of the micro-batches of ``rows`` rows: block i holds rows i,
    i + rows // m, ..., so each block spreads over the batch shards as the whole batch does."""
    if rows % micro_batch_rows:
        raise ValueError(f"{rows} rows do not split into micro-batches of {micro_batch_rows}")
    return jnp.arange(rows).reshape(micro_batch_rows, rows // micro_batch_rows).T


@functools.partial(jax.jit, static_argnames=("models", "temperature", "with_ref", "chunk", "micro_batch_rows"))
def score(models: Models, params, ref_params, tokens, segment_ids, *, temperature: float, with_ref: bool,
          chunk: int = 512, micro_batch_rows: int = 0):
    """Behaviour log-probs, reference log-probs (zeros unless ``with_ref``) and values [B, T].

    With ``micro_batch_rows`` m > 0 (B % m == 0 required) the passes run on m rows at a time
    (``row_blocks``); the results are the same."""

    def passes(tokens, segment_ids):
        logp, _, values = forward(models, params, tokens, segment_ids, temperature, chunk, with_entropy=False)
        if with_ref:
            ref_logp = _policy(models, ref_params, tokens, segment_ids, temperature, chunk, with_entropy=False)[0]
        else:
            ref_logp = jnp.zeros_like(logp)
        return logp, ref_logp, values

    if not micro_batch_rows:
        return passes(tokens, segment_ids)
    B = tokens.shape[0]
    out = jax.lax.map(lambda r: passes(*take_rows((tokens, segment_ids), r)), row_blocks(B, micro_batch_rows))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, *x.shape[2:]), out)  # [B//m, m, T] -> [B, T]


def estimator_config(algo: AlgoSection) -> EstimatorConfig:
    return EstimatorConfig(gamma=algo.gamma, lam=algo.lam, whiten=algo.whiten, whiten_std_floor=algo.whiten_std_floor,
                           scale_by_std=algo.scale_by_std,
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


@functools.partial(jax.jit, static_argnames=("algo",))
def behavior_policy(batch: StepBatch, logp_bt, *, algo: AlgoSection):
    """pi_old of the update and each step's truncated importance weight, from a scored batch.

    ``batch.old_logp`` [B, T] holds the sampler's log-probs (of the truncated distribution it
    drew from), ``logp_bt`` [B, T] the trainer's recomputed ones. pi_old is the one
    ``algo.behavior_logp`` names (0 off-action). With ``algo.behavior_weight_cap`` c > 0 the
    weights are ``losses.behavior_weights`` of the recomputed pi_old against the sampler,
    capped at c, else 1.

    Returns (batch with old_logp = pi_old, weights [B, S_row], metrics: the weights' mean and
    the fraction of steps capped, empty without the cap).
    """
    recomputed = jnp.where(batch.action_mask, logp_bt, 0.0)
    weights = jnp.ones(batch.value_pos.shape, jnp.float32)
    metrics = {}
    if algo.behavior_weight_cap:
        weights, (w_sum, n), (capped, _) = losses.behavior_weights(recomputed, batch.old_logp, batch.step_ids,
                                                                   batch.num_slots, cap=algo.behavior_weight_cap)
        metrics = {"behavior/weight_mean": w_sum / jnp.maximum(n, 1),
                   "behavior/weight_capped_frac": capped / jnp.maximum(n, 1)}
    if algo.behavior_logp == "recomputed":
        batch = batch.replace(old_logp=recomputed)
    return batch, weights, metrics


@jax.jit
def drop_steps(batch: StepBatch, drop_ns: jax.Array) -> jax.Array:
    """``batch.step_ids`` [B, T] with the tokens of the steps ``drop_ns`` [N, S] (bool) marks
    set to -1: no longer actions of the update's policy loss, entropy and KL (asynchronous
    training drops steps sampled by a too old policy this way). Their rewards, values and
    returns stay in the credit and the value loss."""
    drop_bt = credit.to_tokens(batch.from_grid(drop_ns.astype(jnp.int32)), batch.step_ids) > 0
    return jnp.where(drop_bt, -1, batch.step_ids)


def loss_terms(logp, ent, values, mb: TrainBatch, models: Models, algo: AlgoSection):
    """Every loss and metric of a minibatch as (sum, denominator), and (ratio_min, ratio_max).

    logp, ent, values [M, T]: the model's outputs on ``mb``. Sums add up over micro-batches;
    the denominators depend only on masks (see ``denominators``).
    """
    S = mb.value_pos.shape[1]
    weights_bs = mb.behavior_weight_bs if algo.behavior_weight_cap else None
    if algo.policy_loss == "step":
        counts = credit.step_counts(mb.step_ids, S)
        adv_bs = credit.step_sums(mb.adv_bt, mb.step_ids, S) / jnp.maximum(counts, 1)
        policy, stats = losses.step_policy_loss(logp, mb.old_logp, adv_bs, mb.step_ids, clip_low=algo.clip_low,
                                                clip_high=algo.clip_high, ratio=algo.ratio,
                                                dual_clip=algo.dual_clip, aggregation=algo.aggregation,
                                                weights_bs=weights_bs)
    else:
        weights_bt = None if weights_bs is None else credit.to_tokens(weights_bs, mb.step_ids)
        policy, stats = losses.token_policy_loss(logp, mb.old_logp, mb.adv_bt, mb.step_ids, clip_low=algo.clip_low,
                                                 clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                                                 aggregation=algo.aggregation, num_steps=S, weights_bt=weights_bt)
    if models.critic_level == "step":
        v = credit.read_at(values, mb.value_pos)
        v_old = credit.read_at(mb.old_values_bt, mb.value_pos)
        value = losses.value_loss(v, v_old, mb.returns_bs, mb.slot_mask, clip=algo.value_clip)
    elif models.critic_level == "token":
        shift = lambda x: jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)  # noqa: E731  V before token t
        value = losses.value_loss(shift(values), shift(mb.old_values_bt), mb.returns_bt, mb.step_ids >= 0,
                                  clip=algo.value_clip)
    else:
        value = jnp.zeros(()), jnp.ones(())
    terms = {"policy_loss": policy, "value_loss": value,
             "entropy": losses.aggregate(ent, mb.step_ids, S, algo.aggregation),
             "clip_frac": stats.clip_frac, "approx_kl": stats.approx_kl, "ratio_mean": stats.ratio_mean}
    if algo.kl_coef:  # there is a reference policy only when KL is used
        terms["kl_ref"] = losses.aggregate(losses.kl_penalty(logp, mb.ref_logp, algo.kl_kind), mb.step_ids, S,
                                           algo.aggregation)
    return terms, (stats.ratio_min, stats.ratio_max)


def denominators(mb: TrainBatch, models: Models, algo: AlgoSection) -> dict:
    """The denominators of ``loss_terms`` on the minibatch ``mb``, without a model pass: they
    depend only on masks, so zero log-probs, entropies and values give them."""
    zeros = jnp.zeros(mb.tokens.shape, jnp.float32)
    return {k: den for k, (_, den) in loss_terms(zeros, zeros, zeros, mb, models, algo)[0].items()}


def objective(means: dict, algo: AlgoSection) -> jax.Array:
    """Policy loss + value_coef * value loss (+ KL, - entropy bonus): linear in the means, so
    micro-batch contributions add up to the minibatch's loss."""
    total = means["policy_loss"] + algo.value_coef * means["value_loss"] - algo.entropy_coef * means["entropy"]
    if algo.kl_coef and not algo.kl_in_reward:
        total = total + algo.kl_coef * means["kl_ref"]
    return total


def loss_fn(params, mb: TrainBatch, dens: dict, models: Models, algo: AlgoSection, temperature: float, chunk: int):
    """(loss, (means, (ratio_min, ratio_max))) of ``mb``: each sum is divided by ``dens``, the
    denominators of the whole minibatch ``mb`` is part of."""
    logp, ent, values = forward(models, params, mb.tokens, mb.segment_ids, temperature, chunk)
    terms, extremes = loss_terms(logp, ent, values, mb, models, algo)
    means = {k: total / jnp.maximum(dens[k], 1) for k, (total, _) in terms.items()}
    return objective(means, algo), (means, extremes)


def make_update(models: Models, algo: AlgoSection, temperature: float, tx: optax.GradientTransformation, *,
                chunk: int = 512, micro_batch_rows: int = 0):
    """update(state, batch, rows) -> (state, metrics): one step on the minibatch ``rows`` [M]
    of ``batch`` (see ``take_rows``); jit it with donation of the state.

    With ``micro_batch_rows`` m > 0 (M % m == 0 required) the gradient is accumulated (float32)
    over M // m micro-batches of m rows; it equals the whole minibatch's gradient, as each
    micro-batch's terms are normalised by the whole minibatch's denominators.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch: TrainBatch, rows: jax.Array):
        mb = take_rows(batch, rows)
        dens = denominators(mb, models, algo)
        if not micro_batch_rows:
            grads, (means, (ratio_min, ratio_max)) = grad_fn(state.params, mb, dens, models, algo, temperature, chunk)
        else:
            def micro_batch(acc, r):
                grads, (means, extremes) = grad_fn(state.params, take_rows(batch, r), dens, models, algo,
                                                   temperature, chunk)
                return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, (grads, means)), extremes

            zeros = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), (state.params, dens))
            blocks = rows[row_blocks(rows.shape[0], micro_batch_rows)]
            (grads, means), (mins, maxs) = jax.lax.scan(micro_batch, zeros, blocks)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            ratio_min, ratio_max = jnp.min(mins), jnp.max(maxs)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = means | {"ratio_min": ratio_min, "ratio_max": ratio_max, "loss": objective(means, algo),
                           "grad_norm": optax.tree.norm(grads)}
        metrics["skipped"] = 1.0 - jnp.isfinite(metrics["loss"] + metrics["grad_norm"]).astype(jnp.float32)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return update
