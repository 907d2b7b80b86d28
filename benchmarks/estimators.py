"""StepPO against the baseline estimators on the demo task, from the same warm start.

Each variant trains the default configuration (configs/default.yaml) with only its credit
assignment / policy loss changed, and is evaluated greedily on the held-out tasks every
``--eval-every`` iterations. Prints a markdown table and writes benchmarks/out/estimators.json.

    PYTHONPATH=. .venv/bin/python benchmarks/estimators.py [--iterations 20] [--seeds 0] [--variants steppo grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from steppo_jax.train.config import load_config
from steppo_jax.train.metrics import read_metrics
from steppo_jax.train.rl import Trainer

# StepPO is the default (step GAE + step-ratio loss); the baselines use token-level PPO losses.
VARIANTS = {
    "steppo": [],
    "token_ppo": ["algo.estimator=token_gae", "algo.policy_loss=token"],
    "grpo": ["algo.estimator=grpo", "algo.policy_loss=token"],
    "rloo": ["algo.estimator=rloo", "algo.policy_loss=token"],
    "reinforce_pp": ["algo.estimator=reinforce_pp", "algo.policy_loss=token"],
    "gigpo": ["algo.estimator=gigpo", "algo.policy_loss=token"],
}


def run(name: str, seed: int, args) -> dict:
    run_dir = os.path.join(args.run_root, f"{name}_s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(args.config, [*VARIANTS[name], f"seed={seed}", f"run_dir={run_dir}",
                                    f"train.iterations={args.iterations}", f"train.eval_every={args.eval_every}",
                                    f"train.checkpoint_every={args.iterations}"])
    t0 = time.perf_counter()
    summary = Trainer(cfg, log=lambda _: None).fit()
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = {r["iteration"] + 1: r["eval/success"] for r in records if "eval/success" in r}
    rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
    return {"variant": name, "seed": seed, "overrides": VARIANTS[name], "evals": evals,
            "initial": summary["initial_success_rate"], "final": summary["final_success_rate"],
            "reward_first5": float(np.mean(rewards[:5])), "reward_last5": float(np.mean(rewards[-5:])),
            "wall_s": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--run-root", default="runs/estimators")
    parser.add_argument("--out", default="benchmarks/out/estimators.json")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for name in args.variants:
            results.append(run(name, seed, args))
            r = results[-1]
            print(f"{name} seed {seed}: greedy {r['initial']:.1%} -> {r['final']:.1%}, evals {r['evals']}, "
                  f"sampled reward {r['reward_first5']:.2f} -> {r['reward_last5']:.2f} ({r['wall_s']:.0f}s)", flush=True)
    iters = sorted(results[0]["evals"])  # 0 = the warm start
    print("\n| variant | seed | greedy success after " + " / ".join(map(str, iters))
          + " iterations | sampled reward, first 5 -> last 5 iterations |")
    print("|---|---|---|---|")
    for r in results:
        curve = " / ".join(f"{r['evals'][i]:.0%}" for i in iters)
        print(f"| {r['variant']} | {r['seed']} | {curve} | {r['reward_first5']:.2f} → {r['reward_last5']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
