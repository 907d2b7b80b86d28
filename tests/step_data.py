"""Random ragged trajectories, laid out packed and as per-step rows (test data only)."""

from __future__ import annotations

import dataclasses

import numpy as np

from steppo_jax.rollout.records import first_fit_decreasing
from steppo_jax.types import StepBatch


@dataclasses.dataclass
class Trajectory:
    prompt: int  # prompt length
    actions: list[int]  # action length of each step (>= 1)
    observations: list[int]  # observation length after each step but the last
    final_obs: int  # tokens after the last action: the final observation (may be 0)
    rewards: list[float]
    anchors: list[int]
    terminated: bool
    group: int


def random_trajectories(rng: np.random.Generator, num: int, max_steps: int, *, num_groups: int | None = None,
                        empty_frac: float = 0.15, final_obs: bool = True, num_anchors: int = 3,
                        max_action: int = 4, max_obs: int = 3) -> list[Trajectory]:
    """Trajectories with 0..S steps (0 = a padding row), random groups and anchors."""
    num_groups = num_groups or max(1, num // 3)
    trajs = []
    for _ in range(num):
        n = 0 if rng.random() < empty_frac else int(rng.integers(1, max_steps + 1))
        trajs.append(Trajectory(
            prompt=int(rng.integers(1, 4)),
            actions=[int(rng.integers(1, max_action + 1)) for _ in range(n)],
            observations=[int(rng.integers(1, max_obs + 1)) for _ in range(max(n - 1, 0))],
            final_obs=int(rng.integers(0, 3)) if final_obs else 0,
            rewards=[float(x) for x in rng.choice([0.0, 1.0, -0.5, 2.0], size=n)],
            anchors=[int(x) for x in rng.integers(0, num_anchors, size=n)],
            terminated=bool(rng.random() < 0.6),
            group=int(rng.integers(0, num_groups)),
        ))
    return trajs


def _layout(t: Trajectory):
    """Positions of each step's action tokens in the packed stream, and its length."""
    pos, spans = t.prompt, []
    for k, a in enumerate(t.actions):
        spans.append((pos, pos + a))
        pos += a + (t.observations[k] if k < len(t.observations) else 0)
    return spans, pos + (t.final_obs if t.actions else 0)


def packed_batch(trajs: list[Trajectory], max_steps: int, seq_len: int | None = None, seed: int = 0) -> StepBatch:
    """One row per trajectory (the packed layout of DESIGN §2)."""
    rng = np.random.default_rng(seed)
    lens = [_layout(t)[1] for t in trajs]
    T = seq_len or max(lens)
    B, S = len(trajs), max_steps
    f = _empty(B, T, S, B, S)
    for b, t in enumerate(trajs):
        spans, length = _layout(t)
        f["tokens"][b, :length] = rng.integers(1, 50, size=length)
        f["seq_lens"][b] = length
        for k, (s, e) in enumerate(spans):
            f["action_mask"][b, s:e] = True
            f["step_ids"][b, s:e] = k
            f["value_pos"][b, k] = s - 1
            f["old_logp"][b, s:e] = -rng.random(e - s) * 2
            f["ref_logp"][b, s:e] = -rng.random(e - s) * 2
        _fill_grid(f, b, t)
    return StepBatch(**f)


def step_rows_batch(trajs: list[Trajectory], max_steps: int, seq_len: int | None = None, seed: int = 0,
                    num_rows: int | None = None, pack_len: int | None = None) -> StepBatch:
    """One row per (trajectory, step): the context up to the step plus its action, and one
    per truncated trajectory: its final state (its whole packed row, final observation
    included; ``bootstrap_row``/``bootstrap_pos`` point at its last token).

    Token ids and log-probs are those of ``packed_batch`` with the same seed, so step row
    (i, k) is a prefix of trajectory i's packed row. With ``pack_len`` the rows are packed
    first-fit decreasing into rows of ``pack_len`` tokens, segment ids 1, 2, ... (0 on the
    padding), slot j of a row its j-th segment (final states after the steps).
    """
    packed = packed_batch(trajs, max_steps, seed=seed)
    pairs = [(i, k) for i, t in enumerate(trajs) for k in range(len(t.actions))]
    finals = [i for i, t in enumerate(trajs) if t.actions and not t.terminated]
    ends = [_layout(trajs[i])[0][k][1] for i, k in pairs] + [_layout(trajs[i])[1] for i in finals]
    bins = first_fit_decreasing(ends, pack_len) if pack_len else [[j] for j in range(len(ends))]
    R = num_rows or max(len(bins), 1)
    T = pack_len or seq_len or max(ends + [1])
    S_row = max([sum(j < len(pairs) for j in b) for b in bins] + [1])
    f = _empty(R, T, S_row, len(trajs), max_steps)
    f["traj_index"] = np.full((R, S_row), -1, np.int32)
    f["step_index"] = np.full((R, S_row), -1, np.int32)
    f["bootstrap_row"] = np.full((len(trajs),), -1, np.int32)
    f["bootstrap_pos"] = np.full((len(trajs),), -1, np.int32)
    if pack_len:
        f["segment_ids"] = np.zeros((R, T), np.int32)
    for r, members in enumerate(bins):
        off = 0
        for slot, j in enumerate(members):
            end = ends[j]
            if j >= len(pairs):
                i = finals[j - len(pairs)]
                f["tokens"][r, off:off + end] = packed.tokens[i, :end]
                f["bootstrap_row"][i], f["bootstrap_pos"][i] = r, off + end - 1
                if pack_len:
                    f["segment_ids"][r, off:off + end] = slot + 1
                off += end
                continue
            i, k = pairs[j]
            s = _layout(trajs[i])[0][k][0]
            f["tokens"][r, off:off + end] = packed.tokens[i, :end]
            f["action_mask"][r, off + s:off + end] = True
            f["step_ids"][r, off + s:off + end] = slot
            f["value_pos"][r, slot] = off + s - 1
            f["old_logp"][r, off + s:off + end] = packed.old_logp[i, s:end]
            f["ref_logp"][r, off + s:off + end] = packed.ref_logp[i, s:end]
            f["traj_index"][r, slot], f["step_index"][r, slot] = i, k
            if pack_len:
                f["segment_ids"][r, off:off + end] = slot + 1
            off += end
        f["seq_lens"][r] = off
    for i, t in enumerate(trajs):
        _fill_grid(f, i, t)
    return StepBatch(**f)


def _empty(B, T, S_row, N, S):
    return {
        "tokens": np.zeros((B, T), np.int32), "action_mask": np.zeros((B, T), bool),
        "step_ids": np.full((B, T), -1, np.int32), "seq_lens": np.zeros((B,), np.int32),
        "value_pos": np.zeros((B, S_row), np.int32), "old_logp": np.zeros((B, T), np.float32),
        "ref_logp": np.zeros((B, T), np.float32), "step_rewards": np.zeros((N, S), np.float32),
        "step_mask": np.zeros((N, S), bool), "anchor_ids": np.zeros((N, S), np.int32),
        "terminated": np.zeros((N,), bool), "group_ids": np.zeros((N,), np.int32),
    }


def _fill_grid(f, i: int, t: Trajectory) -> None:
    n = len(t.actions)
    f["step_rewards"][i, :n] = t.rewards
    f["step_mask"][i, :n] = True
    f["anchor_ids"][i, :n] = t.anchors
    f["terminated"][i] = t.terminated
    f["group_ids"][i] = t.group
