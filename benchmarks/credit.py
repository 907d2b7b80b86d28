"""Credit estimators end to end (token inputs -> token advantages) on three workloads.

For each estimator: our jitted kernel, a per-trajectory loop implementation in PyTorch
(benchmarks/loop_baselines.py) and a device memory copy of the same bytes, all measured
in this run. Prints a table and writes JSON to benchmarks/out/credit.json.

    PYTHONPATH=. .venv/bin/python benchmarks/credit.py            # the three workloads of issue 2
    PYTHONPATH=. .venv/bin/python benchmarks/credit.py --quick    # small sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from steppo_jax.estimators import ESTIMATORS, EstimatorConfig
from steppo_jax.types import StepBatch

WORKLOADS = {  # name: (trajectories, steps, tokens per step)
    "256x5x1024": (256, 5, 1024),
    "128x20x1024": (128, 20, 1024),
    "1024x16x512": (1024, 16, 512),
}
QUICK = {"32x4x128": (32, 4, 128)}
CFG = EstimatorConfig(gamma=0.99, lam=0.95)
# Token inputs each estimator reads, besides the [B, S] step arrays.
TOKEN_INPUTS = {"step_gae": ("step_ids", "values"), "token_gae": ("step_ids", "action_mask", "values")}


def make_batch(B: int, S: int, L: int, seed: int = 0):
    """Packed rows: a 64-token prompt, then per step L tokens: 3/4 action, 1/4 observation."""
    rng = np.random.default_rng(seed)
    T = S * L + 64
    act = 3 * L // 4
    n_steps = rng.integers(1, S + 1, size=B)
    n_steps[0] = S
    k = (np.arange(T) - 64) // L
    within = (np.arange(T) - 64) % L
    is_act = (np.arange(T) >= 64) & (within < act)
    step_ids = np.where(is_act[None] & (k[None] < n_steps[:, None]), k[None], -1).astype(np.int32)
    value_pos = (64 + np.arange(S) * L - 1)[None].repeat(B, 0).astype(np.int32)
    step_mask = np.arange(S)[None] < n_steps[:, None]
    seq_lens = (64 + n_steps * L).astype(np.int32)
    batch = StepBatch(
        tokens=np.zeros((B, T), np.int32), action_mask=step_ids >= 0, step_ids=step_ids, seq_lens=seq_lens,
        value_pos=value_pos, old_logp=np.zeros((B, T), np.float32), ref_logp=np.zeros((B, T), np.float32),
        step_rewards=np.where(step_mask, rng.choice([0.0, 1.0], size=(B, S)), 0).astype(np.float32),
        step_mask=step_mask, anchor_ids=rng.integers(0, 4, size=(B, S)).astype(np.int32),
        terminated=rng.random(B) < 0.7, group_ids=(np.arange(B) // 8).astype(np.int32))
    values = rng.normal(size=(B, T)).astype(np.float32)
    return batch, values


def best_time(fn, repeats: int) -> float:
    fn()  # compile
    return timing.best_time(fn, repeats)


def token_bytes(name: str, batch: StepBatch, values) -> int:
    """Bytes of the token-level inputs read plus the [B, T] float32 output written."""
    arrays = {"step_ids": batch.step_ids, "action_mask": batch.action_mask, "values": values}
    reads = sum(arrays[k].nbytes for k in TOKEN_INPUTS.get(name, ("step_ids", "action_mask")))
    return reads + values.nbytes


def copy_time(nbytes: int, repeats: int) -> float:
    """A device copy moving nbytes in total (read half, write half)."""
    buf = jnp.zeros((max(nbytes // 8, 1),), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    return best_time(lambda: copy(buf).block_until_ready(), repeats)


def run(workloads, repeats: int, loop_repeats: int):
    import torch

    from benchmarks import loop_baselines as loops

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for wname, (B, S, L) in workloads.items():
        batch, values = make_batch(B, S, L)
        dev_batch, dev_values = jax.device_put((batch, values))
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in vars(batch).items() if v is not None}
        t["values"] = torch.from_numpy(values)
        loop_fns = {
            "step_gae": lambda: loops.step_gae(t, CFG.gamma, CFG.lam),
            "token_gae": lambda: loops.token_gae(t, CFG.gamma, CFG.lam),
            "grpo": lambda: loops.grpo(t), "rloo": lambda: loops.rloo(t),
            "reinforce_pp": lambda: loops.reinforce_pp(t), "gigpo": lambda: loops.gigpo(t, CFG.gamma),
        }
        for name, est in ESTIMATORS.items():
            fn = jax.jit(lambda b, v, f=est.fn: f(b, v, CFG).advantages_bt)
            ours = best_time(lambda: fn(dev_batch, dev_values).block_until_ready(), repeats)
            got = np.asarray(fn(dev_batch, dev_values))
            want = loop_fns[name]().numpy()
            err = float(np.max(np.abs(got - want)))
            loop = best_time(loop_fns[name], loop_repeats)
            nbytes = token_bytes(name, batch, values)
            copy = copy_time(nbytes, repeats)
            rows.append(dict(workload=wname, estimator=name, ours_ms=ours * 1e3, loop_ms=loop * 1e3,
                             speedup_vs_loop=loop / ours, copy_ms=copy * 1e3, time_over_copy=ours / copy,
                             gbytes_per_s=nbytes / ours / 1e9, max_abs_diff_vs_loop=err))
            r = rows[-1]
            print(f"{wname:>12} {name:>13} ours {r['ours_ms']:9.2f} ms  loop {r['loop_ms']:10.1f} ms  "
                  f"x{r['speedup_vs_loop']:8.1f}  copy {r['copy_ms']:7.2f} ms  ours/copy {r['time_over_copy']:6.2f}  "
                  f"{r['gbytes_per_s']:6.2f} GB/s  |diff| {err:.1e}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small workload (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/out/credit.json")
    args = parser.parse_args()
    rows = run(QUICK if args.quick else WORKLOADS, args.repeats, args.loop_repeats)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                devices=[str(d) for d in jax.devices()], jax=jax.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
