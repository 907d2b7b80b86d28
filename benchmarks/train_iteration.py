"""Packed trajectories vs per-step rows: the device side of one RL iteration.

The same synthetic trajectories (prompt, then K steps of reply + observation) are laid out
packed (one row per trajectory) and as per-step rows (one row per step, repeating the
history). For each layout: the scoring pass (policy + critic), the estimator, and one
update (forward + backward + AdamW) on all rows, with the default tiny model. Prints a table
and writes benchmarks/out/train_iteration.json.

    PYTHONPATH=. .venv/bin/python benchmarks/train_iteration.py [--steps 5 10 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.timing import best_time
from steppo_jax.rollout import TrajectoryRecord, packed_batch, step_rows_batch
from steppo_jax.train.config import load_config
from steppo_jax.train.state import build_models, init_state, make_mesh, make_optimizer
from steppo_jax.train.update import TrainBatch, assign_credit, make_update, score


def trajectories(num: int, steps: int, *, prompt: int = 128, reply: int = 32, obs: int = 32, vocab: int = 2000):
    rng = np.random.default_rng(0)
    out = []
    for i in range(num):
        r = TrajectoryRecord(task_id=i, seed=0, group=i // 4)
        r.append_context(rng.integers(1, vocab, prompt).tolist())
        for k in range(steps):
            r.append_action(rng.integers(1, vocab, reply).tolist(), -rng.random(reply))
            r.rewards.append(float(k == steps - 1))
            r.anchors.append(k)
            if k < steps - 1:
                r.append_context(rng.integers(1, vocab, obs).tolist())
        r.terminated = True
        out.append(r)
    return out


def iteration_time(cfg, models, state, tx, batch, repeats: int) -> float:
    update = jax.jit(make_update(models, cfg.algo, 1.0, tx))

    def run():
        logp, ref, values = score(models, state.params, None, batch.tokens, batch.segment_ids, temperature=1.0,
                                  with_ref=False)
        credit, _ = assign_credit(batch.replace(old_logp=logp), values, algo=cfg.algo)
        zeros = logp * 0
        mb = TrainBatch(batch.tokens, batch.step_ids, logp, zeros, credit.advantages_bt, zeros, values,
                        batch.value_pos, batch.slot_mask(), credit.returns_bs,
                        np.ones(batch.value_pos.shape, np.float32), batch.segment_ids)
        return update(state, mb, np.arange(mb.tokens.shape[0]))[1]["loss"]

    jax.block_until_ready(run())  # compile
    return best_time(lambda: jax.block_until_ready(run()), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/train_iteration.json")
    args = parser.parse_args()
    cfg = load_config("configs/default.yaml", ["model.warm_start=null"])
    mesh = make_mesh(cfg)
    models, params = build_models(cfg, 2004, mesh)
    tx = make_optimizer(cfg.optim, 100)
    rows = []
    with jax.set_mesh(mesh):
        state = init_state(params, tx)
        for k in args.steps:
            recs = trajectories(args.trajectories, k)
            packed = packed_batch(recs, k)
            per_step = step_rows_batch(recs, k, pack=False, num_rows=args.trajectories * k)
            rows_sharding = NamedSharding(mesh, P(("data", "fsdp")))  # as the trainer places batches
            t_packed = iteration_time(cfg, models, state, tx, jax.device_put(packed, rows_sharding), args.repeats)
            t_rows = iteration_time(cfg, models, state, tx, jax.device_put(per_step, rows_sharding), args.repeats)
            row = dict(steps=k, packed_tokens=int(packed.tokens.size), rows_tokens=int(per_step.tokens.size),
                       real_tokens_packed=int(packed.seq_lens.sum()), real_tokens_rows=int(per_step.seq_lens.sum()),
                       packed_s=t_packed, rows_s=t_rows, speedup=t_rows / t_packed)
            rows.append(row)
            print(f"{k:>3} steps  packed {packed.tokens.shape} {t_packed:7.3f}s   per-step rows {per_step.tokens.shape} "
                  f"{t_rows:7.3f}s   speedup x{row['speedup']:.1f}   real tokens per trajectory "
                  f"{row['real_tokens_packed'] / args.trajectories:.0f} vs {row['real_tokens_rows'] / args.trajectories:.0f}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                                              devices=[str(d) for d in jax.devices()], rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
