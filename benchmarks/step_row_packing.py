"""Packing per-step rows: rows x T before and after, on a batch shaped like the paper's HotpotQA run.

The paper's configuration (configs/paper_hotpotqa_qwen2.5_3b.yaml): 256 trajectories of at
most 5 steps, the prompt rebuilt every step, ``rollout.max_context`` 11,264. The synthetic
step row k (k = 0, 1, ...) of a trajectory holds

    instructions + question  ~ U[700, 1000] tokens
    + k search results        ~ U[1500, 2500] tokens each (the documents retrieved so far)
    + the reply               ~ U[100, 1024] tokens

(capped at the context limit), so rows run from about 1k to 11k tokens; the number of steps is
1..5 with probabilities 0.15, 0.35, 0.25, 0.15, 0.10, or 5 for every trajectory (``--all-5``,
the worst case). "Before" is the layout before packing: one step per row, rows and length each
rounded up to a power of two. "After" packs the step rows first-fit decreasing into rows of
the bucketed longest row and rounds the rows up to the mesh's multiple (data x fsdp shards x
minibatches) only. Only lengths are laid out (the arrays would take gigabytes), with the same
functions ``step_rows_batch`` uses.

    PYTHONPATH=. .venv/bin/python -m benchmarks.step_row_packing [--all-5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from steppo_jax.rollout.records import bucket_len, first_fit_decreasing, round_up

TRAJECTORIES, MAX_CONTEXT = 256, 11_264
STEP_PROBS = (0.15, 0.35, 0.25, 0.15, 0.10)


def step_row_lengths(rng: np.random.Generator, all_five: bool) -> list[int]:
    """Token counts of every step row of the batch."""
    out = []
    for _ in range(TRAJECTORIES):
        steps = 5 if all_five else int(rng.choice(5, p=STEP_PROBS)) + 1
        prompt, results = int(rng.integers(700, 1001)), rng.integers(1500, 2501, steps)
        for k in range(steps):
            row = prompt + int(results[:k].sum()) + int(rng.integers(100, 1025))
            out.append(min(row, MAX_CONTEXT))
    return out


def power_of_two(n: int, minimum: int) -> int:
    """The rounding before packing: the next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-5", action="store_true", help="every trajectory takes 5 steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = step_row_lengths(np.random.default_rng(args.seed), args.all_5)
    real = sum(lengths)
    print(f"{len(lengths)} step rows of {min(lengths)}..{max(lengths)} tokens (mean {real / len(lengths):.0f}), "
          f"{real:,} real tokens")

    def report(name: str, rows: int, seq_len: int, extra: str = "") -> None:
        processed = rows * seq_len
        print(f"  {name:<34} {rows:>5} rows x {seq_len:>6} = {processed:>11,} tokens   "
              f"efficiency {real / processed:6.1%}{extra}")

    report("before: one per row, powers of two", power_of_two(len(lengths), 8), power_of_two(max(lengths), 64))
    T = bucket_len(max(lengths), maximum=MAX_CONTEXT)
    t0 = time.perf_counter()
    bins = first_fit_decreasing(lengths, T)
    pack_s = time.perf_counter() - t0
    for multiple in (8, 64):
        report(f"one per row, row multiple {multiple}", round_up(len(lengths), multiple), T)
        report(f"after: packed, row multiple {multiple}", round_up(len(bins), multiple), T,
               f"   (at most {max(len(b) for b in bins)} steps in a row)")
    print(f"first-fit decreasing of {len(lengths)} step rows into {len(bins)} rows: {pack_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
