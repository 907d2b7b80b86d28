"""What ``validate`` costs the trainer: it checks every batch on the host (``Trainer._local_batch``).

A host's share of the paper's HotpotQA batch (configs/paper_hotpotqa_qwen2.5_3b.yaml: 256
trajectories over the 8 hosts of a v5e-32, so 32 per host, up to 5 steps, rows up to 11,264
tokens; lengths drawn as in ``benchmarks/step_row_packing.py``), laid out as packed step rows
with ``step_rows_batch``, then validated. Prints both times and their ratio (the baseline is
the layout the trainer builds anyway, measured in the same run).

    PYTHONPATH=. .venv/bin/python -m benchmarks.validate_cost [--trajectories 32] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.timing import best_time
from steppo_jax.rollout.records import TrajectoryRecord, step_rows_batch
from steppo_jax.types import validate

MAX_CONTEXT, VOCAB = 11_264, 151_936
STEP_PROBS = (0.15, 0.35, 0.25, 0.15, 0.10)


def record(rng: np.random.Generator, task: int) -> TrajectoryRecord:
    """A trajectory whose context grows: prompt, then reply and search result per step."""
    rec = TrajectoryRecord(task_id=task, seed=0, group=task)
    rec.append_context(rng.integers(0, VOCAB, int(rng.integers(700, 1001))).tolist())
    steps = int(rng.choice(5, p=STEP_PROBS)) + 1
    for k in range(steps):
        room = MAX_CONTEXT - len(rec.tokens)
        n = min(int(rng.integers(100, 1025)), room)
        rec.append_action(rng.integers(0, VOCAB, n).tolist(), -rng.random(n))
        rec.rewards.append(float(k == steps - 1))
        rec.anchors.append(k)
        obs = min(int(rng.integers(1500, 2501)), MAX_CONTEXT - len(rec.tokens) - 1024)
        if k == steps - 1 or obs <= 0:
            rec.rewards[-1] = 1.0
            break
        rec.append_context(rng.integers(0, VOCAB, obs).tolist())
    rec.terminated = True
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    records = [record(rng, i) for i in range(args.trajectories)]
    batch = step_rows_batch(records, 5, seq_len=MAX_CONTEXT)
    print(f"{args.trajectories} trajectories, {int(batch.slot_mask().sum())} steps -> {batch.batch_size} rows x "
          f"{batch.seq_len} tokens ({batch.num_slots} slots a row)")
    layout_s = best_time(lambda: step_rows_batch(records, 5, seq_len=MAX_CONTEXT), args.repeats)
    validate_s = best_time(lambda: validate(batch), args.repeats)
    print(f"step_rows_batch {layout_s * 1e3:8.1f} ms   (baseline)")
    print(f"validate        {validate_s * 1e3:8.1f} ms   {validate_s / layout_s:.2f}x the layout")


if __name__ == "__main__":
    main()
