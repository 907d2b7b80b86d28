"""Rollout throughput on the default environment with the tiny model, and what the trainer
must process per trajectory in the packed layout vs per-step rows.

    PYTHONPATH=. .venv/bin/python benchmarks/rollout.py [--batches 3]

Measures environment steps/s and generated tokens/s of the rollout loop (sampler + envs +
host glue, split by time), with the shipped warm-start policy. Then, from the measured mean
prompt, reply and observation lengths, the tokens per trajectory of each layout for 5, 10
and 20-step trajectories (per-step rows repeat the history every step). Writes
benchmarks/out/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from steppo_jax.rollout import RolloutTimings
from steppo_jax.train.config import load_config
from steppo_jax.train.rl import load_policy_params
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.state import build_models
from steppo_jax.train.tasks import TaskBatches, task_split


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/rollout.json")
    args = parser.parse_args()
    cfg = load_config(args.config)
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    if cfg.model.warm_start:
        params["policy"] = load_policy_params(cfg.model.warm_start, params["policy"])
    B = cfg.rollout.tasks_per_iter * cfg.rollout.group_size
    sampler = rt.sampler(nnx.merge(models.policy_def, params["policy"]), B)
    engine = rt.engine(sampler)
    tasks = TaskBatches(task_split(cfg.env, rt.env_factory()()).train, cfg.rollout.tasks_per_iter, cfg.seed)
    engine.collect(tasks(0), cfg.rollout.group_size, jax.random.key(0))  # compile
    timings, records, wall = RolloutTimings(), [], 0.0
    for i in range(1, args.batches + 1):
        t0 = time.perf_counter()
        records += engine.collect(tasks(i), cfg.rollout.group_size, jax.random.key(i), timings)
        wall += time.perf_counter() - t0
    steps = sum(r.num_steps for r in records)
    generated = sum(e - s for r in records for s, e in r.step_spans)
    prompt = np.mean([r.step_spans[0][0] for r in records if r.step_spans])
    reply = generated / max(steps, 1)
    gaps = [r.step_spans[k + 1][0] - r.step_spans[k][1] for r in records for k in range(len(r.step_spans) - 1)]
    obs = float(np.mean(gaps)) if gaps else 0.0
    result = dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(), trajectories=len(records),
                  env_steps_per_s=steps / wall, generated_tokens_per_s=generated / wall,
                  time_split={"sampler": timings.sampler_s / wall, "env": timings.env_s / wall,
                              "glue": timings.glue_s / wall},
                  mean_prompt=float(prompt), mean_reply=float(reply), mean_observation=obs, layouts=[])
    print(f"{len(records)} trajectories, {steps} env steps, {generated} generated tokens in {wall:.2f}s: "
          f"{steps / wall:.1f} env steps/s, {generated / wall:.0f} tokens/s")
    print("time split: " + ", ".join(f"{k} {v:.0%}" for k, v in result["time_split"].items()))
    print(f"mean prompt {prompt:.0f}, reply {reply:.1f}, observation {obs:.1f} tokens")
    for k in (5, 10, 20):
        packed = prompt + k * reply + (k - 1) * obs
        rows = sum(prompt + j * (reply + obs) + reply for j in range(k))
        result["layouts"].append(dict(steps=k, packed_tokens=packed, per_step_rows_tokens=rows, ratio=rows / packed))
        print(f"{k:>3} steps: packed {packed:7.0f} tokens/trajectory, per-step rows {rows:7.0f}  (x{rows / packed:.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
