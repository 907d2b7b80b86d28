"""Memory and speed of one PPO update: the memory-lean path against the path of before.

Both paths run the trainer's own update (``train.update.make_update``) on the same model and
batch; only config knobs differ:

- before: ``model.attention=dense``, ``model.remat=none``, log-probs over the whole row at once
  (``optim.logprob_chunk`` = T: float32 [B, T, V] logits), no micro-batches;
- lean: ``attention=chunked``, ``remat=full``, ``logprob_chunk=512``, ``micro_batch_rows=1``;
- default: the shipped defaults (``attention=auto``: chunked on CPU, no remat, chunk 512).

Peak memory is XLA's compiled plan for the update (arguments + temporaries + outputs - aliased,
per device): d=512, 8 layers, vocab 32,768, 2 rows of 4,096 tokens. Speed is train tokens/s of
the compiled update at T=512 (8 rows), before vs default. Prints a table and writes
benchmarks/out/memory.json.

    PYTHONPATH=. .venv/bin/python benchmarks/memory.py [--rows 2 --seq 4096 --speed-seq 512]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import best_time
from steppo_jax.train.config import load_config
from steppo_jax.train.state import build_models, init_state, make_mesh, make_optimizer
from steppo_jax.train.update import TrainBatch, make_update

MODEL = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1536",
         "model.critic=shared", "model.warm_start=null"]
VOCAB = 32_768
PATHS = {
    "before": lambda seq: ["model.attention=dense", "model.remat=none", f"optim.logprob_chunk={seq}",
                           "optim.micro_batch_rows=0"],
    "lean": lambda seq: ["model.attention=chunked", "model.remat=full", "optim.logprob_chunk=512",
                         "optim.micro_batch_rows=1"],
    "default": lambda seq: [],
}


def batch(rows: int, seq: int, steps: int = 4) -> TrainBatch:
    """Rows of a 128-token prompt, then ``steps`` replies separated by observations."""
    rng = np.random.default_rng(0)
    step_ids = np.full((rows, seq), -1, np.int32)
    value_pos = np.zeros((rows, steps), np.int32)
    span = (seq - 128) // steps
    for k in range(steps):
        start = 128 + k * span
        step_ids[:, start:start + span // 2] = k
        value_pos[:, k] = start - 1
    act = step_ids >= 0
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return TrainBatch(tokens=rng.integers(0, VOCAB, (rows, seq)).astype(np.int32), step_ids=step_ids,
                      old_logp=np.where(act, -3.0, 0.0).astype(np.float32), ref_logp=np.zeros((rows, seq), np.float32),
                      adv_bt=np.where(act, f(rows, seq), 0.0).astype(np.float32), returns_bt=f(rows, seq),
                      old_values_bt=f(rows, seq), value_pos=value_pos, slot_mask=np.ones((rows, steps), bool),
                      returns_bs=f(rows, steps), behavior_weight_bs=np.ones((rows, steps), np.float32),
                      segment_ids=None)


def build(path: str, rows: int, seq: int):
    cfg = load_config("configs/default.yaml", MODEL + PATHS[path](seq) + ["algo.kl_coef=0"])
    mesh = make_mesh(cfg)
    models, params = build_models(cfg, VOCAB, mesh)
    tx = make_optimizer(cfg.optim, 100)
    with jax.set_mesh(mesh):
        state = init_state(params, tx)
    update = jax.jit(make_update(models, cfg.algo, 1.0, tx, chunk=cfg.optim.logprob_chunk,
                                 micro_batch_rows=cfg.optim.micro_batch_rows), donate_argnums=0)
    return mesh, state, update, batch(rows, seq)


def peak_bytes(path: str, rows: int, seq: int) -> dict:
    mesh, state, update, b = build(path, rows, seq)
    with jax.set_mesh(mesh):
        m = update.lower(state, b, np.arange(rows)).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes)}


def tokens_per_s(path: str, rows: int, seq: int) -> float:
    mesh, state, update, b = build(path, rows, seq)
    idx = np.arange(rows)
    holder = [state]

    def run():
        holder[0], metrics = update(holder[0], b, idx)
        jax.block_until_ready(metrics)

    with jax.set_mesh(mesh):
        run()  # compile
        seconds = best_time(run, repeats=5)
    return rows * seq / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--speed-rows", type=int, default=8)
    parser.add_argument("--speed-seq", type=int, default=512)
    args = parser.parse_args()
    memory = {p: peak_bytes(p, args.rows, args.seq) for p in ("before", "lean")}
    speed = {p: tokens_per_s(p, args.speed_rows, args.speed_seq) for p in ("before", "default")}
    out = {"machine": platform.processor() or platform.machine(), "backend": jax.default_backend(),
           "memory_rows": args.rows, "memory_seq": args.seq, "memory": memory,
           "peak_ratio": memory["before"]["peak_bytes"] / memory["lean"]["peak_bytes"],
           "temp_ratio": memory["before"]["temp_bytes"] / memory["lean"]["temp_bytes"],
           "speed_rows": args.speed_rows, "speed_seq": args.speed_seq, "tokens_per_s": speed,
           "speed_ratio": speed["default"] / speed["before"]}
    gib = 2 ** 30
    print(f"one update, d=512, 8 layers, vocab {VOCAB}, {args.rows} rows x {args.seq} tokens ({out['backend']})")
    for p, m in memory.items():
        print(f"  {p:8s} peak {m['peak_bytes'] / gib:7.2f} GiB   temp {m['temp_bytes'] / gib:7.2f} GiB   "
              f"arguments {m['argument_bytes'] / gib:5.2f} GiB")
    print(f"  peak before / lean: {out['peak_ratio']:.1f}x   temporaries: {out['temp_ratio']:.1f}x")
    print(f"train tokens/s at {args.speed_rows} x {args.speed_seq}: before {speed['before']:.0f}, "
          f"default {speed['default']:.0f}  (default / before {out['speed_ratio']:.2f}x)")
    Path("benchmarks/out").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/out/memory.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
