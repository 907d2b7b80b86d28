"""The ``steppo`` command: sft, train, eval, export, demo, plan and compare.

    steppo demo                                   # StepPO from the shipped warm start, then eval
    steppo sft   --config configs/default.yaml
    steppo train --config configs/default.yaml algo.estimator=grpo rollout.group_size=8
    steppo train --config configs/default.yaml --resume
    steppo eval  --checkpoint runs/default/checkpoints
    steppo export --checkpoint runs/default/checkpoints --out runs/default/hf
    steppo plan  --config configs/paper_hotpotqa_qwen2.5_3b.yaml --topology v5e-32   # fits? (exit 1 if not)
    steppo compare --config configs/default.yaml --methods step_gae,grpo --seeds 0,1,2 --out runs/compare

With ``STEPPO_DISTRIBUTED=1`` (one process per host), demo, sft, train and eval first join the
run's processes (``steppo_jax.train.distributed.initialize``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from steppo_jax.train import distributed
from steppo_jax.train.compare import METHODS
from steppo_jax.train.config import ConfigError, load_config


DEFAULT_CONFIG = os.path.join("configs", "default.yaml")
# Errors in what the user gave (config, files, checkpoints, batches from their environment):
# one line and exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = ("ConfigError", "PlanError", "CheckpointError", "BatchError", "UnknownEnvironmentError", "HubError",
               "DistributedError", "FileNotFoundError")


def config_path(path: str | None) -> str:
    """``--config``; without it ``configs/default.yaml`` in the working directory, else in the
    clone the package is installed from, so ``steppo demo`` runs from any directory."""
    if path is not None:
        return path
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        if os.path.isfile(os.path.join(root, DEFAULT_CONFIG)):
            return os.path.join(root, DEFAULT_CONFIG)
    raise ConfigError(f"no --config given and no {DEFAULT_CONFIG} in {os.getcwd()} or beside the package")


def _config(args):
    run_dir = [f"run_dir={args.run_dir}"] if getattr(args, "run_dir", None) else []
    return load_config(config_path(args.config), [*args.overrides, *run_dir])


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of ``USER_ERRORS`` (by class name: their modules load lazily)."""
    return any(cls.__name__ in USER_ERRORS for cls in type(err).__mro__)


def cmd_sft(args) -> dict:
    from steppo_jax.train.checkpoint import CheckpointManager
    from steppo_jax.train.rl import load_policy_params
    from steppo_jax.train.runtime import Runtime
    from steppo_jax.train.sft import run_sft
    from steppo_jax.train.state import build_models

    cfg = _config(args)
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    if cfg.sft.init:
        params["policy"] = load_policy_params(cfg.sft.init, params["policy"])
    policy, stats = run_sft(rt, models, params["policy"])
    path = os.path.join(cfg.run_dir, "sft")
    with CheckpointManager(path, keep=1) as manager:
        manager.save(cfg.sft.steps, {"policy": policy}, stats)
    if distributed.is_main():
        print(f"sft checkpoint: {path}  (train from it with model.warm_start={path})")
    return {"policy": policy, **stats}


def cmd_train(args, policy_params=None) -> dict:
    from steppo_jax.train.rl import Trainer

    cfg = _config(args)
    trainer = Trainer(cfg, policy_params=policy_params)
    try:
        summary = trainer.fit(resume=args.resume)
    finally:
        trainer.ckpt.close()
    if distributed.is_main():
        print(json.dumps(summary, indent=1))
        print(f"run directory: {cfg.run_dir} (metrics.jsonl, curves.png, summary.json, checkpoints/)")
    return summary


def cmd_demo(args) -> dict:
    """StepPO from the shipped warm start on the default config, in a fresh run directory."""
    from steppo_jax.train.storage import as_path

    cfg = _config(args)
    if distributed.is_main():
        as_path(cfg.run_dir).rmtree(missing_ok=True)  # the demo always starts over
    distributed.barrier("demo: run directory cleared")
    summary = cmd_train(argparse.Namespace(**{**vars(args), "resume": False}))
    if distributed.is_main():
        print(f"demo: greedy success on {cfg.env.eval_tasks} held-out tasks {summary['initial_success_rate']:.1%} "
              f"(warm start) -> {summary['final_success_rate']:.1%} after StepPO, {summary['wall_time_s']:.0f}s")
    return summary


def trainer_from_checkpoint(path: str):
    """The ``Trainer`` of the run whose ``checkpoints/`` directory is ``path``, restored to its
    latest checkpoint (its config from the checkpoint); a CheckpointError naming what is wrong."""
    from steppo_jax.train.checkpoint import CheckpointError, CheckpointManager
    from steppo_jax.train.config import config_from_dict
    from steppo_jax.train.rl import Trainer
    from steppo_jax.train.storage import as_path

    if not as_path(path).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    with CheckpointManager(path) as manager:  # closed before any error: no orbax threads left at exit
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        _, meta = manager.restore(step)
    if "config" not in meta:
        raise CheckpointError(f"{path} holds no run config (is it an SFT checkpoint? train from it instead)")
    cfg = config_from_dict(meta["config"])
    import dataclasses

    trainer = Trainer(dataclasses.replace(cfg, run_dir=os.fspath(as_path(path).parent)))
    trainer.restore()
    return trainer


def cmd_eval(args) -> dict:
    trainer = trainer_from_checkpoint(args.checkpoint)
    stats = trainer.evaluate()
    trainer.ckpt.close()
    if distributed.is_main():
        print(json.dumps({"iteration": trainer.iteration, **stats}, indent=1))
    return stats


def cmd_export(args) -> None:
    from flax import nnx

    from steppo_jax.models import save_hf_checkpoint

    trainer = trainer_from_checkpoint(args.checkpoint)
    model = nnx.merge(trainer.models.policy_def, trainer.state.params["policy"])
    trainer.ckpt.close()
    save_hf_checkpoint(model, args.out)
    trainer.rt.tokenizer.save_pretrained(args.out)
    print(f"exported the policy to {args.out}")


class DoesNotFit(Exception):
    """``steppo plan``: a program of the config does not fit the topology (exit status 1)."""


def cmd_plan(args) -> dict:
    """Compiles the run's programs for a topology without weights; raises DoesNotFit."""
    import jax

    # host computations stay on the CPU even where libtpu is installed (or on a TPU VM)
    jax.config.update("jax_platforms", "cpu")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from steppo_jax.tokenizer import load_tokenizer
    from steppo_jax.train import plan

    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise plan.PlanError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    only = args.programs.split(",")
    unknown = sorted(set(only) - set(plan.PROGRAMS))
    if unknown:
        raise plan.PlanError(f"unknown program(s) {', '.join(unknown)}; choose among {', '.join(plan.PROGRAMS)}")
    cfg = _config(args)
    if args.topology:
        topo = plan.topology(args.topology)
        devices, chip, name = plan.topology_devices(topo), topo.chip, topo.name
        host = plan.topology_devices(plan.host_topology(topo))
    else:
        devices, chip, name, host = jax.devices("cpu")[:args.cpu_devices], None, f"cpu-{args.cpu_devices}", None
        if len(devices) < args.cpu_devices:
            raise plan.PlanError(f"JAX started with {len(devices)} CPU devices before --cpu-devices was read: "
                                 "run steppo plan in a process of its own")
    vocab = len(load_tokenizer(cfg.model.tokenizer_path)) if cfg.model.source == "tiny" else 0
    report = plan.plan(cfg, devices, name=name, vocab_size=vocab, chip=chip, host_devices=host, only=only,
                       log=lambda line: print(f"steppo plan: {line}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=1) if args.json else plan.table(report))
    line = plan.verdict(cfg, report)
    if line:
        raise DoesNotFit(line)
    return report


def cmd_compare(args) -> dict:
    from steppo_jax.train.compare import Grid, parse_list, run_grid, summarise, table

    grid = Grid(config_path(args.config), parse_list(args.methods, "methods"), parse_list(args.seeds, "seeds", int),
                args.out, args.overrides)
    failed = [] if args.summarise_only else run_grid(grid, jobs=args.jobs)
    result = summarise(grid, threshold=args.threshold)
    print(table(result))
    print(f"{result['finished']} of {result['cells']} cells finished; {args.out}/compare.json, compare.md, compare.png")
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed: " + ", ".join(f"{c.method} seed {c.seed}" for c in failed))
    return result


def main(argv=None) -> int:
    debug = "show the traceback of user errors too (bad config, files, checkpoints)"
    parser = argparse.ArgumentParser(prog="steppo", description="Step-level RL (StepPO) for LLM agents, in JAX.")
    parser.add_argument("--debug", action="store_true", help=debug)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])  # --debug after the command too

    def with_config(p):
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG}, here or in the clone)")
        p.add_argument("--run-dir", help="overrides run_dir")
        p.add_argument("overrides", nargs="*", help="field=value overrides, e.g. algo.estimator=grpo")

    p = command("demo", help="StepPO from the shipped SFT warm start on the default, then evaluation "
                             "and plots (in runs/demo, overwritten)")
    with_config(p)
    p.set_defaults(fn=cmd_demo, run_dir="runs/demo", distributed=True)
    p = command("sft", help="behaviour cloning on expert trajectories")
    with_config(p)
    p.set_defaults(fn=cmd_sft, distributed=True)
    p = command("train", help="RL training (StepPO by default)")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.set_defaults(fn=cmd_train, distributed=True)
    p = command("eval", help="greedy success on held-out tasks of a trained run")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory")
    p.set_defaults(fn=cmd_eval, distributed=True)
    p = command("export", help="write the policy as a Hugging Face checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_export)
    p = command("plan", help="does the config fit a topology? compiles its programs ahead of time, no "
                             "weights needed (exit 1 if not)")
    with_config(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice, e.g. v5e-32, v5p-64, v4-32, v6e-8 (needs jax[tpu])")
    where.add_argument("--cpu-devices", type=int, metavar="N", help="N host CPU devices (no memory limit)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--programs", default="score,update,prefill,decode",
                   help="comma-separated programs to compile (default: %(default)s)")
    p.set_defaults(fn=cmd_plan)
    p = command("compare", help="a grid of credit methods x seeds on one config (resumable), then compare.json, "
                                "compare.md and compare.png")
    p.add_argument("--config", help=f"YAML config of every cell (default: {DEFAULT_CONFIG}, here or in the clone)")
    p.add_argument("--methods", default="step_gae,token_gae,grpo,rloo,gigpo",
                   help="comma-separated methods, from: " + ", ".join(METHODS) + " (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--out", required=True, help="grid directory: one run directory per cell, and the summary")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each its own process (default: 1)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="greedy success whose first iteration is reported (default: %(default)s)")
    p.add_argument("--summarise-only", action="store_true", help="rebuild the summary from finished cells only")
    p.add_argument("overrides", nargs="*", help="field=value overrides for every cell, e.g. train.iterations=20")
    p.set_defaults(fn=cmd_compare)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "distributed", False):
            distributed.initialize()
        args.fn(args)
    except DoesNotFit as err:
        print(f"steppo {args.command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        print(f"steppo {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
