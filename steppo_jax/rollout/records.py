"""Trajectory records from the host loop, and their layout as step tensors.

A ``TrajectoryRecord`` keeps every token exactly as it entered the model: the prompt ids,
each step's sampled ids (with their behaviour log-probs) and each observation's template
delta ids. ``packed_batch`` lays records out one row per trajectory; ``step_rows_batch``
one step row per (trajectory, step) — the context the policy saw at that step plus its
reply — several of them packed into one row by default.
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
      rebuilds the prompt each step (history windows); None when contexts only grow. A
      trajectory with a final state has one more: ``contexts[num_steps]``, the context the
      next step would have been sampled from.
    rewards, anchors: per step; anchors[k] is the state before step k.
    versions: per step, the policy version that sampled it (``Sampler.set_params``).
    overflowed: the episode was cut because its final observation did not fit in the
      context: the state after the last step is not recorded (bootstrap 0).
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
    versions: list[int] = dataclasses.field(default_factory=list)
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    failed: str | None = None
    success: bool = False
    invalid_calls: int = 0
    overflowed: bool = False
    live: bool = True

    def append_context(self, ids: Sequence[int]) -> None:
        self.tokens.extend(ids)
        self.logprobs.extend([0.0] * len(ids))

    def append_action(self, ids: Sequence[int], logprobs: Sequence[float], version: int = 0) -> None:
        self.versions.append(version)
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

    def step_row_len(self, k: int) -> int:
        """Tokens of the row for step k (``len(self.step_row(k)[0])`` without building it)."""
        start, end = self.step_spans[k]
        return end if self.contexts is None else len(self.contexts[k]) + end - start

    @property
    def has_final_state(self) -> bool:
        """The episode was cut (not terminated) after at least one step and the state after its
        last step is recorded: its value bootstraps the return."""
        return self.failed is None and not self.terminated and not self.overflowed and self.num_steps > 0

    def final_row(self) -> list[int] | None:
        """Ids of the final state (the context the next step would have been sampled from, its
        last token the bootstrap position), or None without one: the whole stream when
        contexts grow (it ends with the final observation), else ``contexts[num_steps]``."""
        if not self.has_final_state:
            return None
        if self.contexts is None:
            return self.tokens
        if len(self.contexts) <= self.num_steps:
            raise ValueError(f"a truncated trajectory of {self.num_steps} steps with rebuilt contexts needs "
                             f"contexts[{self.num_steps}] (the context after its last step) to bootstrap from")
        return self.contexts[self.num_steps]

    def stats(self) -> dict[str, Any]:
        return {"steps": self.num_steps, "tokens": len(self.tokens),
                "action_tokens": sum(e - s for s, e in self.step_spans), "return": float(sum(self.rewards)),
                "success": self.success, "invalid_calls": self.invalid_calls, "failed": self.failed is not None,
                "terminated": self.terminated}


def bucket_len(n: int, minimum: int = 64, maximum: int | None = None) -> int:
    """The padded length of ``n`` tokens: a few static shapes, little padding.

    Up to 1024 the next power of two (at least ``minimum``); above, the next multiple of 1024
    (at most 1023 tokens of padding, under 10% beyond 10k tokens). ``maximum`` (the context
    limit) caps the result when ``n`` fits under it. So a run compiles for at most
    log2(1024 / minimum) + 1 + maximum / 1024 lengths, and in practice for a few: the longest
    row of a large batch sits near the context limit.
    """
    b = max(minimum, 1 << max(n - 1, 0).bit_length()) if n <= 1024 else -(-n // 1024) * 1024
    return min(b, maximum) if maximum is not None and n <= maximum else b


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= max(n, 1)."""
    return -(-max(n, 1) // multiple) * multiple


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items into bins of ``capacity``: bins of item indices (each in increasing order).

    Items go longest first (ties: lower index first) into the first bin with room, a new bin
    when none has: deterministic, and within 11/9 of the fewest bins plus one.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} of length {lengths[too_long[0]]} exceeds the capacity {capacity}")
    room = np.zeros(len(lengths), np.int64)  # at most one bin per item
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = np.flatnonzero(room[:len(bins)] >= lengths[i])
        j = int(fits[0]) if fits.size else len(bins)
        if j == len(bins):
            bins.append([])
            room[j] = capacity
        bins[j].append(i)
        room[j] -= lengths[i]
    return [sorted(b) for b in bins]


def _grid(records: Sequence[TrajectoryRecord], num_steps: int, num_traj: int | None = None) -> dict[str, np.ndarray]:
    """The [N, S] and [N] fields, N = ``num_traj`` (default: one per record). Failed
    trajectories, and the padding ones after the records, have no steps (excluded)."""
    n = num_traj or len(records)
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
        out["terminated"][i] = not r.has_final_state
    return out


def packed_batch(records: Sequence[TrajectoryRecord], num_steps: int, seq_len: int | None = None, *,
                 num_rows: int | None = None, row_multiple: int = 1) -> StepBatch:
    """One row per trajectory: [B = N, T] tokens, slots == steps (numpy arrays).

    T = ``seq_len`` or the bucketed longest trajectory; B = ``num_rows`` or the number of
    records rounded up to ``row_multiple``, the rows after the records empty (no steps). A
    truncated trajectory's row ends with its final state (bootstrap at its last token); one
    without (``overflowed``) is marked ``terminated``.
    """
    if any(r.contexts is not None for r in records):
        raise ValueError("these trajectories rebuild their context each step: use step_rows_batch")
    T = seq_len or bucket_len(max(len(r.tokens) for r in records))
    B = num_rows or round_up(len(records), row_multiple)
    if len(records) > B:
        raise ValueError(f"{len(records)} trajectories do not fit in num_rows={B}")
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
    return StepBatch(**f, **_grid(records, num_steps, B))


def step_rows_batch(records: Sequence[TrajectoryRecord], num_steps: int, *, pack: bool = True,
                    seq_len: int | None = None, num_rows: int | None = None, num_slots: int | None = None,
                    row_multiple: int = 1) -> StepBatch:
    """Per-step rows: each (trajectory, step) is the context the policy saw plus its reply.

    With ``pack`` several step rows share a row of T tokens (first-fit decreasing by length),
    one segment each: segment ids 1, 2, ... in the order of the row's segments, 0 on the padding
    (so padding never shares a segment with real tokens); positions restart and attention
    stays within each segment. Without it each row holds one step row. Slot j of a row is its
    j-th segment: ``step_ids`` j on its reply, ``traj_index``/``step_index`` [B, S_row] its
    grid cell, ``value_pos`` the token before its reply. Each truncated trajectory adds one
    more row, its final state (``TrajectoryRecord.final_row``), packed with the others after
    a row's step rows: ``bootstrap_row``/``bootstrap_pos`` [N] name it and its last token.

    T = ``seq_len`` or the bucketed longest step row or final state; B = ``num_rows`` or the rows used
    rounded up to ``row_multiple``; S_row = ``num_slots`` or the most steps in one row,
    rounded up to a power of two (a few static shapes). Raises ``ValueError`` naming a step
    row longer than T, or when the rows or slots given are too few.
    """
    pairs = [(i, k) for i, r in enumerate(records) if r.failed is None for k in range(r.num_steps)]
    rows = [records[i].step_row(k) for i, k in pairs]
    finals = [(i, ids) for i, r in enumerate(records) if (ids := r.final_row()) is not None]
    lengths = [len(ids) for ids, _, _ in rows] + [len(ids) for _, ids in finals]
    T = seq_len or bucket_len(max(lengths, default=1))
    for (i, k), n in zip(pairs, lengths):
        if n > T:
            raise ValueError(f"step row ({i}, {k}) has {n} tokens > seq_len={T}")
    for (i, _), n in zip(finals, lengths[len(pairs):]):
        if n > T:
            raise ValueError(f"the final state of trajectory {i} has {n} tokens > seq_len={T}")
    # bins list item indices in increasing order: a row's step rows before its final states
    bins = first_fit_decreasing(lengths, T) if pack else [[j] for j in range(len(lengths))]
    R = num_rows or round_up(len(bins), row_multiple)
    if len(bins) > R:
        raise ValueError(f"{len(pairs)} steps and {len(finals)} final states need {len(bins)} rows > num_rows={R}")
    most = max((sum(j < len(pairs) for j in b) for b in bins), default=1)
    S_row = num_slots or bucket_len(most, minimum=1)
    if most > S_row:
        raise ValueError(f"a row packs {most} steps > num_slots={S_row}")
    f = _rows(R, T, S_row)
    f["traj_index"] = np.full((R, S_row), -1, np.int32)
    f["step_index"] = np.full((R, S_row), -1, np.int32)
    f["segment_ids"] = np.zeros((R, T), np.int32)
    grid = _grid(records, num_steps)
    N = len(grid["terminated"])
    f["bootstrap_row"], f["bootstrap_pos"] = np.full((N,), -1, np.int32), np.full((N,), -1, np.int32)
    for row, members in enumerate(bins):
        pos = 0
        for seg, j in enumerate(members):  # a row's step rows come first: slot == seg for them
            if j < len(pairs):
                (i, k), (ids, logp, start) = pairs[j], rows[j]
                end = pos + len(ids)
                f["old_logp"][row, pos + start:end] = logp[start:]
                f["action_mask"][row, pos + start:end] = True
                f["step_ids"][row, pos + start:end] = seg
                f["value_pos"][row, seg] = pos + start - 1
                f["traj_index"][row, seg], f["step_index"][row, seg] = i, k
            else:
                i, ids = finals[j - len(pairs)]
                end = pos + len(ids)
                f["bootstrap_row"][i], f["bootstrap_pos"][i] = row, end - 1
            f["tokens"][row, pos:end] = ids
            f["segment_ids"][row, pos:end] = seg + 1
            pos = end
        f["seq_lens"][row] = pos
    return StepBatch(**f, **grid)


def _rows(B: int, T: int, S_row: int) -> dict[str, np.ndarray]:
    return {"tokens": np.zeros((B, T), np.int32), "action_mask": np.zeros((B, T), bool),
            "step_ids": np.full((B, T), -1, np.int32), "seq_lens": np.zeros((B,), np.int32),
            "value_pos": np.zeros((B, S_row), np.int32), "old_logp": np.zeros((B, T), np.float32),
            "ref_logp": np.zeros((B, T), np.float32)}
