"""Builds the shipped warm-start checkpoint of the demo: SFT of the tiny default model on
noisy expert trajectories of the default environment (configs/default.yaml, section sft).

    .venv/bin/python scripts/make_warm_start.py [--out steppo_jax/assets/warm_start] [overrides...]

`make demo` then trains with StepPO from it (model.warm_start in configs/default.yaml), so
the demo fits in minutes on 2 CPU cores; `steppo sft` runs the same SFT from scratch.
"""

import argparse
import shutil

from steppo_jax.train.checkpoint import CheckpointManager
from steppo_jax.train.config import load_config
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.sft import run_sft
from steppo_jax.train.state import build_models


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default="steppo_jax/assets/warm_start")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "model.warm_start=null"])
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    policy, stats = run_sft(rt, models, params["policy"])
    shutil.rmtree(args.out, ignore_errors=True)
    CheckpointManager(args.out, keep=1).save(cfg.sft.steps, {"policy": policy}, stats)
    print(f"wrote {args.out}: {stats}")


if __name__ == "__main__":
    main()
