"""Trajectory records from the host loop, and their layout as step tensors.

A ``TrajectoryRecord`` keeps every token exactly as it entered the model: the prompt ids,
each step's sampled ids (with their behaviour log-probs) and each observation's template
delta ids. ``packed_batch`` lays records out one row per trajectory; ``step_rows_batch``
one row per (trajectory, step) — the context the policy saw at that step plus its reply.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import numpy as np

from steppo_jax.types import StepBatch


def anchor_id(anchor: str) -> int:
    """A stable int32 hash of an environment state description (GiGPO anchors)."""
    return zlib.crc32(anchor.encode("utf-8")) & 0x7FFFFFFF


@dataclasses.dataclass
class TrajectoryRecord:
    """One episode as the policy saw it.

    tokens: the packed stream (prompt, reply 0, observation 0, reply 1, ...).
    step_spans: [start, end) of each reply in ``tokens``.
    logprobs: behaviour log-prob of every token of ``tokens`` (0 off-action).
    contexts: per step, the context ids the reply was sampled from when the environment
      rebuilds the prompt each step (history windows); None when contexts only grow.
    rewards, anchors: per step; anchors[k] is the state before step k.
    """

    task_id: int
    seed: int
    group: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    step_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    contexts: list[list[int]] | None = None
    rewards: list[float] = dataclasses.field(default_factory=list)
    anchors: list[int] = dataclasses.field(default_factory=list)
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    failed: str | None = None
    success: bool = False
    invalid_calls: int = 0
    live: bool = True

    def append_context(self, ids: Sequence[int]) -> None:
        self.tokens.extend(ids)
        self.logprobs.extend([0.0] * len(ids))

    def append_action(self, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        start = len(self.tokens)
        self.tokens.extend(ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.step_spans.append((start, len(self.tokens)))

    @property
    def num_steps(self) -> int:
        return len(self.rewards)

    def step_row(self, k: int) -> tuple[list[int], list[float], int]:
        """(ids, logprobs, first action position) of the row for step k."""
        start, end = self.step_spans[k]
        if self.contexts is None:
            return self.tokens[:end], self.logprobs[:end], start
        ctx = self.contexts[k]
        return ctx + self.tokens[start:end], [0.0] * len(ctx) + self.logprobs[start:end], len(ctx)

    def stats(self) -> dict[str, Any]:
        return {"steps": self.num_steps, "tokens": len(self.tokens),
                "action_tokens": sum(e - s for s, e in self.step_spans), "return": float(sum(self.rewards)),
                "success": self.success, "invalid_calls": self.invalid_calls, "failed": self.failed is not None,
                "terminated": self.terminated}


def bucket_len(n: int, minimum: int = 64) -> int:
    """Smallest power of two >= max(n, minimum): padded lengths come from a few buckets."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _grid(records: Sequence[TrajectoryRecord], num_steps: int) -> dict[str, np.ndarray]:
    """The [N, S] and [N] fields. Failed trajectories are kept as empty rows (excluded)."""
    n = len(records)
    out = {"step_rewards": np.zeros((n, num_steps), np.float32), "step_mask": np.zeros((n, num_steps), bool),
           "anchor_ids": np.zeros((n, num_steps), np.int32), "terminated": np.zeros((n,), bool),
           "group_ids": np.zeros((n,), np.int32)}
    for i, r in enumerate(records):
        out["group_ids"][i] = r.group
        if r.failed is not None:
            continue
        k = r.num_steps
        if k > num_steps:
            raise ValueError(f"trajectory {i} has {k} steps > num_steps={num_steps}")
        out["step_rewards"][i, :k] = r.rewards
        out["step_mask"][i, :k] = True
        out["anchor_ids"][i, :k] = r.anchors[:k]
        out["terminated"][i] = r.terminated
    return out


def packed_batch(records: Sequence[TrajectoryRecord], num_steps: int, seq_len: int | None = None) -> StepBatch:
    """One row per trajectory: [B = N, T] tokens, slots == steps (numpy arrays)."""
    if any(r.contexts is not None for r in records):
        raise ValueError("these trajectories rebuild their context each step: use step_rows_batch")
    T = seq_len or bucket_len(max(len(r.tokens) for r in records))
    B = len(records)
    f = _rows(B, T, num_steps)
    for b, r in enumerate(records):
        if len(r.tokens) > T:
            raise ValueError(f"trajectory {b} has {len(r.tokens)} tokens > seq_len={T}")
        f["tokens"][b, :len(r.tokens)] = r.tokens
        f["seq_lens"][b] = len(r.tokens)
        if r.failed is not None:
            continue
        f["old_logp"][b, :len(r.tokens)] = r.logprobs
        for k, (s, e) in enumerate(r.step_spans[:r.num_steps]):
            f["action_mask"][b, s:e] = True
            f["step_ids"][b, s:e] = k
            f["value_pos"][b, k] = s - 1
    return StepBatch(**f, **_grid(records, num_steps))


def step_rows_batch(records: Sequence[TrajectoryRecord], num_steps: int, *, num_rows: int | None = None,
                    seq_len: int | None = None) -> StepBatch:
    """One row per (trajectory, step); ``traj_index``/``step_index`` map rows to the grid."""
    pairs = [(i, k) for i, r in enumerate(records) if r.failed is None for k in range(r.num_steps)]
    rows = [records[i].step_row(k) for i, k in pairs]
    R = num_rows or bucket_len(max(len(pairs), 1), minimum=8)
    if len(pairs) > R:
        raise ValueError(f"{len(pairs)} steps do not fit in num_rows={R}")
    T = seq_len or bucket_len(max([len(ids) for ids, _, _ in rows] + [1]))
    f = _rows(R, T, 1)
    f["traj_index"] = np.full((R, 1), -1, np.int32)
    f["step_index"] = np.full((R, 1), -1, np.int32)
    for row, ((i, k), (ids, logp, start)) in enumerate(zip(pairs, rows)):
        if len(ids) > T:
            raise ValueError(f"step row ({i}, {k}) has {len(ids)} tokens > seq_len={T}")
        f["tokens"][row, :len(ids)] = ids
        f["seq_lens"][row] = len(ids)
        f["old_logp"][row, :len(ids)] = logp
        f["action_mask"][row, start:len(ids)] = True
        f["step_ids"][row, start:len(ids)] = 0
        f["value_pos"][row, 0] = start - 1
        f["traj_index"][row, 0], f["step_index"][row, 0] = i, k
    return StepBatch(**f, **_grid(records, num_steps))


def _rows(B: int, T: int, S_row: int) -> dict[str, np.ndarray]:
    return {"tokens": np.zeros((B, T), np.int32), "action_mask": np.zeros((B, T), bool),
            "step_ids": np.full((B, T), -1, np.int32), "seq_lens": np.zeros((B,), np.int32),
            "value_pos": np.zeros((B, S_row), np.int32), "old_logp": np.zeros((B, T), np.float32),
            "ref_logp": np.zeros((B, T), np.float32)}
