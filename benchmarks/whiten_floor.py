"""Whitening a batch with no reward signal: how far the policy drifts, without and with a floor
on the std (``algo.whiten_std_floor``).

The shipped warm start (trained on level 1) plays ``multihop_qa`` level 4 (2-4 hops, 200 names),
where it almost never succeeds and malformed calls cost nothing (invalid_penalty 0): most batches
have no reward at all, so step GAE's advantages are only the critic's errors. Whitened to unit
std, that noise could move the policy anyway; the floor keeps it small. Both runs share the seed, tasks and everything else; the
script prints, per iteration, the KL to the warm start, the advantage std the loss saw and the
batch's reward, then the ratio of the final KLs, and writes benchmarks/out/whiten_floor.json.

    PYTHONPATH=. .venv/bin/python benchmarks/whiten_floor.py [--iterations 8] [--floor 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from steppo_jax.train.config import load_config
from steppo_jax.train.metrics import read_metrics
from steppo_jax.train.rl import Trainer


def run(floor: float, args) -> list[dict]:
    run_dir = os.path.join(args.run_root, f"floor{floor}")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(args.config, ["env.options={difficulty: 4, invalid_penalty: 0.0}", "env.max_steps=5",
                                    "rollout.max_context=768",
                                    f"algo.whiten_std_floor={floor}", f"run_dir={run_dir}",
                                    f"train.iterations={args.iterations}", f"train.eval_every={args.iterations}",
                                    f"train.checkpoint_every={args.iterations}", "env.eval_tasks=16"])
    Trainer(cfg, log=lambda _: None).fit()
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "reward/mean" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--floor", type=float, default=0.1)
    parser.add_argument("--run-root", default="runs/whiten_floor")
    parser.add_argument("--out", default="benchmarks/out/whiten_floor.json")
    args = parser.parse_args()
    runs = {"no floor": run(0.0, args), f"floor {args.floor}": run(args.floor, args)}
    print("| iteration | batch reward | " + " | ".join(f"{k}: KL to warm start / adv std" for k in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    base = runs["no floor"]
    for i, record in enumerate(base):
        cells = " | ".join(f"{r[i]['policy/kl']:.2e} / {r[i]['adv/std']:.2f}" for r in runs.values())
        print(f"| {record['iteration']} | {record['reward/mean']:.3f} | {cells} |")
    after = runs[f"floor {args.floor}"]
    ratio = base[-1]["policy/kl"] / max(after[-1]["policy/kl"], 1e-12)
    print(f"\nKL to the warm start after {args.iterations} iterations: no floor / floor {args.floor} = {ratio:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "floor": args.floor, "kl_ratio": ratio,
                                          "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
