"""Estimators by name: a ``StepBatch`` (+ critic values) in, token advantages out.

``get_estimator(name)`` returns an ``Estimator`` so that one config line switches the
algorithm. StepPO's default is ``"step_gae"``; the baselines are ``"token_gae"``,
``"grpo"``, ``"rloo"``, ``"reinforce_pp"`` and ``"gigpo"``. Step-level estimators run on
the [N, S] trajectory grid, so packed rows and per-step rows give the same advantages.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from steppo_jax import credit
from steppo_jax.types import StepBatch


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """Hyper-parameters shared by the estimators (each reads the ones it needs).

    gamma, lam: discount and GAE lambda (per step for step GAE, per token for token GAE).
    whiten: whiten GAE advantages over the batch (per step for step GAE).
    whiten_std_floor: the smallest std whitening divides by (``credit.whiten``).
    scale_by_std: GRPO divides by the group std (False: Dr.GRPO).
    step_weight: GiGPO weight of the step-level (anchor group) term.
    eps: GRPO/GiGPO std epsilon.
    """

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    whiten_std_floor: float = 0.0
    scale_by_std: bool = True
    step_weight: float = 1.0
    eps: float = 1e-6


class Credit(NamedTuple):
    """An estimator's output.

    advantages_bt: [B, T] advantage of each action token (0 elsewhere).
    returns_bs: [B, S_row] step returns for a step-level critic (read at value_pos), or None.
    returns_bt: [B, T] token returns for a token-level critic (read at t - 1), or None.
    """

    advantages_bt: jax.Array
    returns_bs: jax.Array | None = None
    returns_bt: jax.Array | None = None


class Estimator(NamedTuple):
    """fn(batch, values_bt, config) -> Credit; critic: which critic it trains, if any."""

    fn: Callable[[StepBatch, jax.Array | None, EstimatorConfig], Credit]
    critic: Literal["step", "token", None]


def traj_to_tokens(batch: StepBatch, x_n: jax.Array) -> jax.Array:
    """Broadcasts one value per trajectory [N] to its action tokens [B, T]."""
    if batch.packed:  # reads the 1-byte mask, not the step ids
        return jnp.where(batch.action_mask, x_n[:, None], 0.0)
    x_ns = jnp.broadcast_to(x_n[:, None], batch.step_mask.shape)
    return credit.to_tokens(batch.from_grid(x_ns), batch.step_ids)


def _grid_values(batch: StepBatch, values_bt: jax.Array):
    """Critic values at step boundaries on the grid [N, S] and bootstrap values [N]."""
    values_ns = batch.to_grid(credit.read_at(values_bt, batch.value_pos))
    bootstrap = jnp.where(batch.terminated, 0.0, batch.bootstrap_values(values_bt))
    return values_ns, bootstrap


def _scores(batch: StepBatch):
    """Trajectory scores [N] and group ids [N] with empty trajectories in no group (-1)."""
    mask = batch.step_mask.astype(bool)
    scores = jnp.sum(jnp.where(mask, batch.step_rewards, 0.0), axis=1)
    groups = jnp.where(jnp.any(mask, axis=1), batch.group_ids, -1)
    return scores, groups


def _step_gae(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    values_ns, bootstrap = _grid_values(batch, values_bt)
    adv, ret = credit.step_gae(batch.step_rewards, values_ns, batch.step_mask, bootstrap, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten:
        adv = credit.whiten(adv, batch.step_mask, std_floor=cfg.whiten_std_floor)
    return Credit(credit.to_tokens(batch.from_grid(adv), batch.step_ids), returns_bs=batch.from_grid(ret))


def last_action_tokens(step_ids_bt: jax.Array) -> jax.Array:
    """[B, T] bool: the last token of each step (where the step's reward sits)."""
    nxt = jnp.concatenate([step_ids_bt[:, 1:], jnp.full_like(step_ids_bt[:, :1], -1)], axis=1)
    return (step_ids_bt >= 0) & (nxt != step_ids_bt)


def _token_gae(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    if not batch.packed:
        raise ValueError("token_gae needs the packed layout: its recursion runs across the steps of one row")
    rewards_bt = jnp.where(last_action_tokens(batch.step_ids), credit.to_tokens(batch.step_rewards, batch.step_ids), 0.0)
    state_values_bt = jnp.concatenate([values_bt[:, :1], values_bt[:, :-1]], axis=1)
    _, bootstrap = _grid_values(batch, values_bt)
    adv, ret = credit.token_gae(rewards_bt, state_values_bt, batch.action_mask, gamma=cfg.gamma, lam=cfg.lam,
                                bootstrap_b=bootstrap)
    if cfg.whiten:
        adv = credit.whiten(adv, batch.action_mask, std_floor=cfg.whiten_std_floor)
    return Credit(adv, returns_bt=ret)


def _grpo(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    scores, groups = _scores(batch)
    adv = credit.grpo_advantages(scores, groups, num_groups=batch.num_traj, eps=cfg.eps, scale_by_std=cfg.scale_by_std)
    return Credit(traj_to_tokens(batch, adv))


def _rloo(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    scores, groups = _scores(batch)
    return Credit(traj_to_tokens(batch, credit.rloo_advantages(scores, groups, num_groups=batch.num_traj)))


def _reinforce_pp(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    scores, groups = _scores(batch)
    if batch.packed:
        return Credit(credit.reinforce_pp_advantages(scores, groups, batch.action_mask, num_groups=batch.num_traj))
    centred = credit.group_baseline(scores, groups, num_groups=batch.num_traj)
    in_group = traj_to_tokens(batch, (groups >= 0).astype(jnp.float32)) > 0
    return Credit(credit.whiten(traj_to_tokens(batch, centred), in_group))


def _gigpo(batch: StepBatch, values_bt, cfg: EstimatorConfig) -> Credit:
    _, groups = _scores(batch)
    adv = credit.gigpo_advantages(batch.step_rewards, batch.step_mask, groups, batch.anchor_ids, gamma=cfg.gamma,
                                  num_groups=batch.num_traj, step_weight=cfg.step_weight, eps=cfg.eps)
    return Credit(credit.to_tokens(batch.from_grid(adv), batch.step_ids))


ESTIMATORS: dict[str, Estimator] = {
    "step_gae": Estimator(_step_gae, "step"),
    "token_gae": Estimator(_token_gae, "token"),
    "grpo": Estimator(_grpo, None),
    "rloo": Estimator(_rloo, None),
    "reinforce_pp": Estimator(_reinforce_pp, None),
    "gigpo": Estimator(_gigpo, None),
}


def get_estimator(name: str) -> Estimator:
    """The estimator registered under ``name`` (see ``ESTIMATORS``)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
