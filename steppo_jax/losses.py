"""Loss kernels: step-level policy loss (StepPO), token PPO, value loss, KL and entropy.

Every loss returns ``(sum, denominator)`` so that micro-batches and shards aggregate
exactly: the batch loss is ``sum(sums) / sum(denominators)``. Shapes: B rows, T tokens,
S step slots per row; a token belongs to step ``step_ids[b, t]`` (-1: not an action).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from steppo_jax.credit import step_counts, step_sums, to_tokens

Aggregation = Literal["token_mean", "step_mean_token_mean", "step_mean_token_sum"]
AGGREGATIONS = ("token_mean", "step_mean_token_mean", "step_mean_token_sum")


class PolicyLossStats(NamedTuple):
    """Diagnostics of a policy loss, each a (sum, count) pair for exact aggregation.

    clip_frac: steps (tokens for token PPO) whose clipped branch was active.
    approx_kl: k3 estimate of KL(pi_old || pi) over action tokens.
    ratio_mean / ratio_min / ratio_max: statistics of the step (or token) ratios.
    ratios: [B, S] step ratios (step loss) or [B, T] token ratios (token PPO); 0 where
      invalid.
    """

    clip_frac: tuple[jax.Array, jax.Array]
    approx_kl: tuple[jax.Array, jax.Array]
    ratio_mean: tuple[jax.Array, jax.Array]
    ratio_min: jax.Array
    ratio_max: jax.Array
    ratios: jax.Array


def aggregate(loss_bt: jax.Array, step_ids_bt: jax.Array, num_steps: int, aggregation: Aggregation):
    """Reduces a per-token loss on action tokens to ``(sum, denominator)``.

    token_mean: sum over tokens / number of tokens.
    step_mean_token_mean: each step's token mean, summed / number of steps (default).
    step_mean_token_sum: each step's token sum, summed / number of steps.
    """
    counts = step_counts(step_ids_bt, num_steps)
    valid_steps = jnp.sum((counts > 0).astype(loss_bt.dtype))
    is_action = step_ids_bt >= 0
    loss_bt = jnp.where(is_action, loss_bt, 0.0)
    if aggregation == "token_mean":
        return jnp.sum(loss_bt), jnp.sum(is_action.astype(loss_bt.dtype))
    if aggregation == "step_mean_token_mean":
        per_step = step_sums(loss_bt, step_ids_bt, num_steps) / jnp.maximum(counts, 1)
        return jnp.sum(per_step), valid_steps
    if aggregation == "step_mean_token_sum":
        return jnp.sum(loss_bt), valid_steps
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _approx_kl(log_ratio_bt, is_action):
    kl = jnp.where(is_action, jnp.expm1(log_ratio_bt) - log_ratio_bt, 0.0)
    return jnp.sum(kl), jnp.sum(is_action.astype(kl.dtype))


def step_policy_loss(logp_bt, old_logp_bt, adv_bs, step_ids_bt, *, clip_low: float = 0.2, clip_high: float = 0.2,
                     ratio: Literal["geometric", "product"] = "geometric", dual_clip: float | None = None,
                     aggregation: Aggregation = "step_mean_token_mean", weights_bs: jax.Array | None = None):
    """StepPO's clipped surrogate with one importance ratio per step.

    ``log s_k`` is the mean (``ratio="geometric"``, GSPO-style) or the sum
    (``"product"``, the exact step ratio) of ``logp - old_logp`` over step k's tokens.
    Each token carries ``s_t = exp(sg(log s_k) + logp_t - sg(logp_t))``: its value is
    the step ratio and its gradient is the step ratio times ``d logp_t``, and
    ``l_t = max(-A_k s_t, -A_k clip(s_t, 1 - clip_low, 1 + clip_high))``. With
    ``dual_clip = c > 1`` a step with ``A_k < 0`` has ``l_t = min(l_t, -c A_k)``: its loss
    (and so its gradient) stops growing once ``s_k > c``, as in token PPO's dual clip but
    on the step ratio. With ``weights_bs`` each step's ``l_t`` is multiplied by ``w_k``
    (constants, e.g. ``behavior_weights``), after the clipping.

    Args:
      logp_bt: [B, T] current log-probs; old_logp_bt: [B, T] behaviour log-probs.
      adv_bs: [B, S] step advantages; step_ids_bt: [B, T] (-1 off-action).
      weights_bs: [B, S] per-step weights of the loss, or None (all 1).
    Returns:
      ((loss_sum, denominator), PolicyLossStats).
    """
    chex.assert_rank([logp_bt, old_logp_bt, adv_bs, step_ids_bt], [2, 2, 2, 2])
    chex.assert_equal_shape([logp_bt, old_logp_bt, step_ids_bt])
    num_steps = adv_bs.shape[1]
    is_action = step_ids_bt >= 0
    log_ratio_bt = jnp.where(is_action, logp_bt - old_logp_bt, 0.0)
    counts = step_counts(step_ids_bt, num_steps)
    log_s_bs = step_sums(log_ratio_bt, step_ids_bt, num_steps)
    if ratio == "geometric":
        log_s_bs = log_s_bs / jnp.maximum(counts, 1)
    elif ratio != "product":
        raise ValueError(f"ratio must be 'geometric' or 'product', got {ratio!r}")
    log_s_bt = to_tokens(jax.lax.stop_gradient(log_s_bs), step_ids_bt)
    s_bt = jnp.exp(log_s_bt + logp_bt - jax.lax.stop_gradient(logp_bt))
    adv_bt = to_tokens(adv_bs, step_ids_bt)
    unclipped = -adv_bt * s_bt
    clipped = -adv_bt * jnp.clip(s_bt, 1.0 - clip_low, 1.0 + clip_high)
    loss_bt = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss_bt = jnp.where(adv_bt < 0, jnp.minimum(loss_bt, -dual_clip * adv_bt), loss_bt)
    if weights_bs is not None:
        loss_bt = loss_bt * to_tokens(jax.lax.stop_gradient(weights_bs), step_ids_bt)

    s_bs = jnp.exp(jax.lax.stop_gradient(log_s_bs))
    valid = counts > 0
    sg_adv = jax.lax.stop_gradient(adv_bs)
    clip_active = ((sg_adv > 0) & (s_bs > 1.0 + clip_high)) | ((sg_adv < 0) & (s_bs < 1.0 - clip_low))
    stats = _ratio_stats(s_bs, valid, clip_active, jax.lax.stop_gradient(log_ratio_bt), is_action)
    return aggregate(loss_bt, step_ids_bt, num_steps, aggregation), stats


def token_policy_loss(logp_bt, old_logp_bt, adv_bt, step_ids_bt, *, clip_low: float = 0.2, clip_high: float = 0.2,
                      dual_clip: float | None = None, aggregation: Aggregation = "token_mean",
                      num_steps: int | None = None, weights_bt: jax.Array | None = None):
    """Token-level PPO: a ratio per token, optional dual clip for negative advantages.

    ``l_t = max(-A_t r_t, -A_t clip(r_t))``; with ``dual_clip = c > 1`` and ``A_t < 0``,
    ``l_t = min(l_t, -c A_t)``; with ``weights_bt`` [B, T] (constants) ``l_t`` is then
    multiplied by ``w_t``.

    Args:
      logp_bt, old_logp_bt, adv_bt: [B, T]; step_ids_bt: [B, T] (-1 off-action), used
        for the action mask and the step-level aggregation modes.
      num_steps: S for the step-level aggregation modes (default T, always enough).
    Returns:
      ((loss_sum, denominator), PolicyLossStats).
    """
    chex.assert_equal_shape([logp_bt, old_logp_bt, adv_bt, step_ids_bt])
    is_action = step_ids_bt >= 0
    log_ratio_bt = jnp.where(is_action, logp_bt - old_logp_bt, 0.0)
    r_bt = jnp.exp(log_ratio_bt)
    loss_bt = jnp.maximum(-adv_bt * r_bt, -adv_bt * jnp.clip(r_bt, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        loss_bt = jnp.where(adv_bt < 0, jnp.minimum(loss_bt, -dual_clip * adv_bt), loss_bt)
    if weights_bt is not None:
        loss_bt = loss_bt * jax.lax.stop_gradient(weights_bt)
    sg_r = jax.lax.stop_gradient(r_bt)
    sg_adv = jax.lax.stop_gradient(adv_bt)
    clip_active = is_action & (((sg_adv > 0) & (sg_r > 1.0 + clip_high)) | ((sg_adv < 0) & (sg_r < 1.0 - clip_low)))
    stats = _ratio_stats(sg_r, is_action, clip_active, jax.lax.stop_gradient(log_ratio_bt), is_action)
    return aggregate(loss_bt, step_ids_bt, num_steps or step_ids_bt.shape[1], aggregation), stats


def behavior_weights(old_logp_bt, behavior_logp_bt, step_ids_bt, num_steps: int, *, cap: float):
    """Step-level truncated importance weights for a sampler that is not pi_old.

    ``w_k = min(exp(mean over step k's tokens of (old_logp - behavior_logp)), cap)``: the
    geometric-mean ratio of the trainer's pi_old to the distribution the step was sampled
    from, truncated at ``cap`` (TIS at the step level; the same per-token mean as the
    geometric step ratio). Multiplying step k's policy loss by ``w_k`` corrects the
    expectation over samples of pi_behaviour toward pi_old, with variance bounded by the cap.

    Args:
      old_logp_bt, behavior_logp_bt: [B, T] log-probs (read on action tokens only).
      step_ids_bt: [B, T] (-1 off-action).
    Returns:
      (weights [B, S] (1 where step k has no tokens), (weight sum, steps), (capped steps, steps)).
    """
    chex.assert_equal_shape([old_logp_bt, behavior_logp_bt, step_ids_bt])
    is_action = step_ids_bt >= 0
    counts = step_counts(step_ids_bt, num_steps)
    log_w = step_sums(jnp.where(is_action, old_logp_bt - behavior_logp_bt, 0.0), step_ids_bt, num_steps)
    w = jnp.exp(log_w / jnp.maximum(counts, 1))
    valid = counts > 0
    n = jnp.sum(valid.astype(w.dtype))
    capped = valid & (w > cap)
    w = jnp.where(valid, jnp.minimum(w, cap), jnp.ones_like(w))
    return w, (jnp.sum(jnp.where(valid, w, 0.0)), n), (jnp.sum(capped.astype(w.dtype)), n)


def _ratio_stats(ratio, valid, clip_active, log_ratio_bt, is_action) -> PolicyLossStats:
    n = jnp.sum(valid.astype(jnp.float32))
    big = jnp.finfo(jnp.float32).max
    return PolicyLossStats(
        clip_frac=(jnp.sum((clip_active & valid).astype(jnp.float32)), n),
        approx_kl=_approx_kl(log_ratio_bt, is_action),
        ratio_mean=(jnp.sum(jnp.where(valid, ratio, 0.0)), n),
        ratio_min=jnp.min(jnp.where(valid, ratio, big)),
        ratio_max=jnp.max(jnp.where(valid, ratio, -big)),
        ratios=jnp.where(valid, ratio, 0.0),
    )


def value_loss(values_bs, old_values_bs, returns_bs, step_mask_bs, *, clip: float | None = None):
    """Clipped value loss at step boundaries: ``0.5 * max((v - R)^2, (clip(v) - R)^2)``.

    ``clip(v) = clip(v, v_old - c, v_old + c)``; ``clip=None`` disables clipping. Works
    for token-level critics too (pass [B, T] arrays and the action mask).

    Returns:
      (sum over valid entries, number of valid entries).
    """
    chex.assert_equal_shape([values_bs, old_values_bs, returns_bs, step_mask_bs])
    mask = step_mask_bs.astype(bool)
    err = (values_bs - returns_bs) ** 2
    if clip is not None:
        v_clipped = old_values_bs + jnp.clip(values_bs - old_values_bs, -clip, clip)
        err = jnp.maximum(err, (v_clipped - returns_bs) ** 2)
    return jnp.sum(jnp.where(mask, 0.5 * err, 0.0)), jnp.sum(mask.astype(values_bs.dtype))


def kl_penalty(logp, ref_logp, kind: Literal["k1", "k2", "k3"] = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (elementwise).

    With ``x = logp - ref_logp``: k1 = x; k2 = x^2 / 2; k3 = exp(-x) - 1 + x (unbiased,
    non-negative, low variance).
    """
    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x**2
    if kind == "k3":
        return jnp.expm1(-x) + x
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the categorical distributions ``[..., V] -> [...]`` (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
