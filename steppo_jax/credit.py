"""Credit kernels: step-level returns and advantages, and the baselines they replace.

Pure ``jnp`` functions on batch-major arrays, safe under ``jit``/``vmap`` and sharded
batches (explicit or auto mesh axes). Shapes: B rows, T tokens, S steps per row.
Masked-out entries of every output are exactly 0 and never NaN.

The step-level MDP of StepPO (arXiv 2604.18401): the action at step k is the whole
reply, so the recursion runs over steps, with values read at step boundaries::

    delta_k = r_k + gamma * V_{k+1} - V_k          (V_{n} = bootstrap)
    A_k     = delta_k + gamma * lam * A_{k+1}
    R_k     = A_k + V_k
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def step_sums(x_bt: jax.Array, step_ids_bt: jax.Array, num_steps: int) -> jax.Array:
    """Sums token values per step: ``out[b, k] = sum_t x[b, t] * [step_ids[b, t] == k]``.

    Args:
      x_bt: [B, T] values per token.
      step_ids_bt: [B, T] int step id per token; ids outside [0, num_steps) are dropped.
      num_steps: S, static.
    Returns:
      [B, S] per-step sums.
    """
    chex.assert_rank([x_bt, step_ids_bt], 2)
    chex.assert_equal_shape([x_bt, step_ids_bt])
    ids = jnp.where((step_ids_bt >= 0) & (step_ids_bt < num_steps), step_ids_bt, num_steps)
    return jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_steps + 1)[:num_steps])(x_bt, ids)


def step_counts(step_ids_bt: jax.Array, num_steps: int) -> jax.Array:
    """[B, S] int32 number of tokens of each step."""
    return step_sums(jnp.ones_like(step_ids_bt), step_ids_bt, num_steps)


def to_tokens(x_bs: jax.Array, step_ids_bt: jax.Array) -> jax.Array:
    """Broadcasts per-step values to their tokens: ``out[b, t] = x[b, step_ids[b, t]]``.

    Args:
      x_bs: [B, S] per-step values.
      step_ids_bt: [B, T] step id per token (-1 or out of range: not a step token).
    Returns:
      [B, T] values on step tokens, 0 elsewhere.
    """
    chex.assert_rank([x_bs, step_ids_bt], 2)
    num_steps = x_bs.shape[1]
    valid = (step_ids_bt >= 0) & (step_ids_bt < num_steps)
    vals = jnp.take_along_axis(x_bs, jnp.clip(step_ids_bt, 0, num_steps - 1), axis=1)
    return jnp.where(valid, vals, jnp.zeros_like(vals))


def read_at(x_bt: jax.Array, pos_bs: jax.Array) -> jax.Array:
    """Reads token values at positions: ``out[b, k] = x[b, pos[b, k]]`` ([B, T] -> [B, S])."""
    chex.assert_rank([x_bt, pos_bs], 2)
    return jnp.take_along_axis(x_bt, jnp.clip(pos_bs, 0, x_bt.shape[1] - 1), axis=1)


def step_gae(rewards_bs, values_bs, step_mask_bs, bootstrap_b, *, gamma: float, lam: float):
    """Generalised advantage estimation over steps (not whitened).

    Args:
      rewards_bs: [B, S] reward of step k.
      values_bs: [B, S] V(s_k), the value before step k.
      step_mask_bs: [B, S] bool, valid steps are a prefix of length n_b.
      bootstrap_b: [B] value after the last valid step (0 for terminated trajectories).
      gamma, lam: discount and GAE lambda, per step.
    Returns:
      (advantages [B, S], returns [B, S]) with R_k = A_k + V_k; 0 on invalid steps.
    """
    chex.assert_rank([rewards_bs, values_bs, step_mask_bs, bootstrap_b], [2, 2, 2, 1])
    chex.assert_equal_shape([rewards_bs, values_bs, step_mask_bs])
    mask = step_mask_bs.astype(bool)
    next_valid = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    next_values = jnp.concatenate([values_bs[:, 1:], jnp.zeros_like(values_bs[:, :1])], axis=1)
    next_values = jnp.where(next_valid, next_values, bootstrap_b[:, None].astype(values_bs.dtype))
    deltas = jnp.where(mask, rewards_bs + gamma * next_values - values_bs, 0.0)

    def backward(adv_next, xs):
        delta, valid = xs
        adv = jnp.where(valid, delta + gamma * lam * adv_next, jnp.zeros_like(delta))
        return adv, adv

    _, adv_sb = jax.lax.scan(backward, jnp.zeros_like(deltas[:, 0]), (deltas.T, mask.T), reverse=True)
    adv = adv_sb.T
    returns = jnp.where(mask, adv + values_bs, 0.0)
    return adv, returns


def token_gae(rewards_bt, values_bt, action_mask_bt, *, gamma: float, lam: float, bootstrap_b=None):
    """GAE over the action tokens of each trajectory, skipping all other tokens (baseline).

    The recursion links each action token to the next *action* token of the row, so
    observations between steps are transparent. gamma and lam apply per action token.
    One reverse scan over T (time-major, carry [B]); on CPU this beats a chunked
    parallel recurrence, which does several extra passes over [B, T].

    Args:
      rewards_bt: [B, T] reward per token (the step reward sits on its last action token).
      values_bt: [B, T] V of the state before token t (the critic read at t - 1).
      action_mask_bt: [B, T] bool.
      bootstrap_b: [B] value after the last action token (default 0: terminated).
    Returns:
      (advantages [B, T], returns [B, T]); 0 off the action mask.
    """
    chex.assert_rank([rewards_bt, values_bt, action_mask_bt], 2)
    chex.assert_equal_shape([rewards_bt, values_bt, action_mask_bt])
    mask = action_mask_bt.astype(bool)
    if bootstrap_b is None:
        bootstrap_b = jnp.zeros_like(values_bt[:, 0])

    def backward(carry, xs):
        v_next, adv_next = carry  # value and advantage of the next action token
        r, v, m = xs
        adv = r + gamma * v_next - v + gamma * lam * adv_next
        carry = (jnp.where(m, v, v_next), jnp.where(m, adv, adv_next))
        return carry, jnp.where(m, adv, jnp.zeros_like(adv))

    init = (bootstrap_b.astype(values_bt.dtype), jnp.zeros_like(values_bt[:, 0]))
    _, adv_tb = jax.lax.scan(backward, init, (rewards_bt.T, values_bt.T, mask.T), reverse=True)
    adv = adv_tb.T
    return adv, jnp.where(mask, adv + values_bt, 0.0)


def discounted_returns(rewards_bs, step_mask_bs, *, gamma: float):
    """Discounted reward-to-go per step: ``G_k = sum_{i >= k} gamma^(i-k) r_i``.

    Args:
      rewards_bs: [B, S]; step_mask_bs: [B, S] bool (prefix).
    Returns:
      [B, S], 0 on invalid steps.
    """
    chex.assert_rank([rewards_bs, step_mask_bs], 2)
    mask = step_mask_bs.astype(bool)
    rewards = jnp.where(mask, rewards_bs, 0.0)

    def backward(g_next, xs):
        r, m = xs
        g = jnp.where(m, r + gamma * g_next, jnp.zeros_like(r))
        return g, g

    _, g_sb = jax.lax.scan(backward, jnp.zeros_like(rewards[:, 0]), (rewards.T, mask.T), reverse=True)
    return g_sb.T


def whiten(x: jax.Array, mask: jax.Array, *, eps: float = 1e-8, std_floor: float = 0.0) -> jax.Array:
    """(x - mean) / (max(std, std_floor) + eps) over the masked entries of the whole array.

    std is unbiased (n - 1); with fewer than two entries the std is taken as 0.
    Masked-out entries are 0. ``std_floor`` keeps a batch whose advantages barely vary (no
    reward signal: only critic noise) from being blown up to unit scale.
    """
    chex.assert_equal_shape([x, mask])
    mask = mask.astype(bool)
    n = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1)
    centred = jnp.where(mask, x - mean, 0.0)
    var = jnp.sum(centred**2) / jnp.maximum(n - 1, 1)
    return jnp.where(mask, centred / (jnp.maximum(jnp.sqrt(var), std_floor) + eps), 0.0)


def _group_stats(x_b, group_ids_b, num_groups: int):
    """Per-row group count, mean and unbiased std ([B] each) via a [B, G] one-hot.

    Rows with group ids outside [0, num_groups) belong to no group (count 0).
    Reductions over the batch axis are plain sums, so sharded batches stay sharded.
    """
    onehot = (group_ids_b[:, None] == jnp.arange(num_groups)[None, :]).astype(x_b.dtype)
    count_g = jnp.sum(onehot, axis=0)
    mean_g = jnp.sum(onehot * x_b[:, None], axis=0) / jnp.maximum(count_g, 1)
    mean_b = jnp.sum(onehot * mean_g[None, :], axis=1)
    sq_g = jnp.sum(onehot * ((x_b - mean_b) ** 2)[:, None], axis=0)
    std_g = jnp.sqrt(sq_g / jnp.maximum(count_g - 1, 1))
    count_b = jnp.sum(onehot * count_g[None, :], axis=1)
    std_b = jnp.sum(onehot * std_g[None, :], axis=1)
    return count_b, mean_b, std_b


def grpo_advantages(scores_b, group_ids_b, *, num_groups: int, eps: float = 1e-6, scale_by_std: bool = True):
    """GRPO: ``(score - group mean) / (group std + eps)``; std unbiased.

    A group of one gets mean 0 and std 1 (its advantage is its score). With
    ``scale_by_std=False`` (Dr.GRPO) the advantage is ``score - group mean``.
    Rows whose group id is outside [0, num_groups) (padding) get 0.

    Args:
      scores_b: [B] trajectory scores; group_ids_b: [B] int.
    Returns:
      [B] advantages.
    """
    chex.assert_rank([scores_b, group_ids_b], 1)
    count, mean, std = _group_stats(scores_b, group_ids_b, num_groups)
    single = count == 1
    mean = jnp.where(single, 0.0, mean)
    adv = scores_b - mean
    if scale_by_std:
        adv = adv / (jnp.where(single, 1.0, std) + eps)
    return jnp.where(count > 0, adv, 0.0)


def rloo_advantages(scores_b, group_ids_b, *, num_groups: int):
    """RLOO: ``n / (n - 1) * (score - group mean)`` (score minus the mean of the others).

    A group of one gets its score; rows outside any group get 0. Returns [B].
    """
    chex.assert_rank([scores_b, group_ids_b], 1)
    count, mean, _ = _group_stats(scores_b, group_ids_b, num_groups)
    loo = count / jnp.maximum(count - 1, 1) * (scores_b - mean)
    adv = jnp.where(count == 1, scores_b, loo)
    return jnp.where(count > 0, adv, 0.0)


def group_baseline(scores_b, group_ids_b, *, num_groups: int):
    """``score - group mean`` per row ([B]); rows outside any group get 0."""
    chex.assert_rank([scores_b, group_ids_b], 1)
    count, mean, _ = _group_stats(scores_b, group_ids_b, num_groups)
    return jnp.where(count > 0, scores_b - mean, 0.0)


def reinforce_pp_advantages(scores_b, group_ids_b, action_mask_bt, *, num_groups: int, eps: float = 1e-8):
    """REINFORCE++-baseline: ``score - group mean``, broadcast to action tokens, whitened.

    Args:
      scores_b: [B]; group_ids_b: [B] int; action_mask_bt: [B, T] bool.
    Returns:
      [B, T] advantages, whitened over all action tokens of the batch; 0 elsewhere.
    """
    chex.assert_rank([scores_b, group_ids_b, action_mask_bt], [1, 1, 2])
    centred = group_baseline(scores_b, group_ids_b, num_groups=num_groups)
    in_group = (group_ids_b >= 0) & (group_ids_b < num_groups)
    mask = action_mask_bt.astype(bool) & in_group[:, None]
    return whiten_rows(centred, jnp.sum(mask, axis=1), mask, eps=eps)


def whiten_rows(x_b, counts_b, mask_bt, *, eps: float = 1e-8, std_floor: float = 0.0):
    """``whiten`` of ``x_b`` broadcast to the ``counts_b`` masked tokens of each row.

    The same result as ``whiten(where(mask, x_b[:, None], 0), mask)``, but the statistics
    come from [B] values weighted by their token counts: one pass over [B, T].
    """
    w = counts_b.astype(x_b.dtype)
    n = jnp.sum(w)
    mean = jnp.sum(w * x_b) / jnp.maximum(n, 1)
    var = jnp.sum(w * (x_b - mean) ** 2) / jnp.maximum(n - 1, 1)
    z = (x_b - mean) / (jnp.maximum(jnp.sqrt(var), std_floor) + eps)
    return jnp.where(mask_bt, z[:, None], 0.0)


def replicated(x: jax.Array) -> jax.Array:
    """Gathers an explicitly sharded array onto every device (a no-op otherwise): for the
    few ops (sorts, scatters across rows) whose output sharding JAX cannot infer."""
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is not None and any(s is not None for s in spec):
        return jax.sharding.reshard(x, PartitionSpec())
    return x


def _pair_segments(keys_a, keys_b, valid):
    """Dense segment ids [N] of equal (a, b) pairs among valid entries (sort-based)."""
    n = keys_a.shape[0]
    order = jnp.lexsort((keys_b, keys_a, ~valid))
    sa, sb = keys_a[order], keys_b[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])])
    seg_sorted = jnp.cumsum(starts.astype(jnp.int32)) - 1
    return jnp.zeros((n,), jnp.int32).at[order].set(seg_sorted)


def gigpo_advantages(rewards_bs, step_mask_bs, group_ids_b, anchor_ids_bs, *, gamma: float,
                     num_groups: int | None = None, step_weight: float = 1.0, eps: float = 1e-6):
    """GiGPO: episode-level GRPO plus step-level relative advantages within anchor groups.

    ``A_k = GRPO(sum_k r_k) + step_weight * (G_k - mean_U) / (std_U + eps)`` where G_k is
    the discounted return of step k and U is the set of valid steps that share
    (group id, anchor id) across the batch; std unbiased; a set of one contributes 0.

    Args:
      rewards_bs: [B, S]; step_mask_bs: [B, S] bool; group_ids_b: [B] int;
      anchor_ids_bs: [B, S] int hash of the state before step k.
      num_groups: number of episode groups (default B).
    Returns:
      [B, S] advantages, 0 on invalid steps.
    """
    chex.assert_rank([rewards_bs, step_mask_bs, group_ids_b, anchor_ids_bs], [2, 2, 1, 2])
    B, S = rewards_bs.shape
    mask = step_mask_bs.astype(bool)
    scores = jnp.sum(jnp.where(mask, rewards_bs, 0.0), axis=1)
    episode = grpo_advantages(scores, group_ids_b, num_groups=num_groups or B, eps=eps)

    returns = discounted_returns(rewards_bs, mask, gamma=gamma)
    g = replicated(jnp.broadcast_to(group_ids_b[:, None], (B, S)).reshape(-1))
    a = replicated(anchor_ids_bs.reshape(-1))
    valid = replicated(mask.reshape(-1))
    ret = replicated(returns.reshape(-1))
    seg = _pair_segments(g, a, valid)
    n = B * S
    count = jax.ops.segment_sum(valid.astype(ret.dtype), seg, n)
    total = jax.ops.segment_sum(jnp.where(valid, ret, 0.0), seg, n)
    mean = (total / jnp.maximum(count, 1))[seg]
    sq = jax.ops.segment_sum(jnp.where(valid, (ret - mean) ** 2, 0.0), seg, n)
    std = jnp.sqrt(sq / jnp.maximum(count - 1, 1))[seg]
    step_adv = jnp.where(valid & (count[seg] > 1), (ret - mean) / (std + eps), 0.0)
    step_adv = step_adv.reshape(B, S)
    return jnp.where(mask, episode[:, None] + step_weight * step_adv, 0.0)
