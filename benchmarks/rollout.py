"""Rollout throughput on the default environment with the tiny model: the step-synchronous
engine against the slot engine, on environments with a simulated latency; and what the trainer
must process per trajectory in the packed layout vs per-step rows.

    PYTHONPATH=. .venv/bin/python benchmarks/rollout.py [--rounds 2 --depth 3] [--slots 32 --chunk 8]
        [--decode-rows 0]
        [--end-to-end [--seeds 0 1 2 --iterations 10] [--skip-rollout]]

Both engines roll out the same batches with the shipped warm-start policy (so the demo's
reply lengths), rounds alternating between the engines so that machine load hits both
alike: the synchronous engine one batch (its rows) at a time, the slot engine a round's
``depth`` batches at once on ``slots`` slots (one per trajectory of a batch by default),
decoded ``--decode-rows`` at a time (default: every slot), as it runs under asynchronous
training, where the next iterations' trajectories queue behind the current ones (``--depth
1``: one batch at a time for both). ``--slots 96 --decode-rows 32`` holds every trajectory's
cache (3x the synchronous engine's KV memory) and decodes as many rows as it does. Every
environment step first sleeps a log-normal time (median 50 ms, p99 1 s; the
k-th environment built draws the same times under both engines). Reports per engine
environment steps/s, generated tokens/s, the time split (sampler, waiting for environments,
host glue), the slot utilisation (useful decoded tokens / slot-steps) and the share of the
environment pool's capacity it uses (the least time its steps' sleeps could take on the
pool's threads / its wall time: 100% = the environments are the bottleneck); the ratios are
``env_steps_speedup`` (slots / synchronous) and the utilisations. With ``--end-to-end``, also
trains the demo (``--config``) for ``--iterations`` iterations with each seed of
``--seeds``, synchronously (``rollout.max_staleness: 0``) and asynchronously (1, with
``algo.behavior_weight_cap: 2``), and reports ``async_speedup``: the ratio of their mean
iteration times (rollout wait + scoring passes + update, the first iteration's compilation
left out), with each run's final greedy success. Then, from the measured mean
prompt, reply and observation lengths, the tokens per trajectory of each layout for 5, 10 and
20-step trajectories (per-step rows repeat the history every step). Writes
benchmarks/out/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from steppo_jax.rollout import RolloutEngine, RolloutTimings, SlotEngine
from steppo_jax.sampling import Sampler
from steppo_jax.sampling.generate import jit_generate
from steppo_jax.sampling.slots import jit_decode_slots, jit_prefill_slots
from steppo_jax.train.config import load_config
from steppo_jax.train.metrics import read_metrics
from steppo_jax.train.rl import Trainer, load_policy_params
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.state import build_models
from steppo_jax.train.tasks import TaskBatches, task_split

P99_Z = 2.3263478740408408  # the standard normal's 99th percentile


class LatencyEnv:
    """An environment whose every step first sleeps a log-normal time of the given median and
    99th percentile, drawn from ``seed`` (the rest is the wrapped environment's)."""

    def __init__(self, env, seed: int, median_s: float = 0.05, p99_s: float = 1.0):
        self.env, self.name, self.max_steps = env, env.name, env.max_steps
        self.rng = np.random.default_rng(seed)
        self.mu, self.sigma = math.log(median_s), math.log(p99_s / median_s) / P99_Z
        self.slept = 0.0  # seconds this environment has slept (its steps run one at a time)

    def reset(self, task_id, seed):
        return self.env.reset(task_id, seed)

    def step(self, action_text):
        pause = self.rng.lognormal(self.mu, self.sigma)
        self.slept += pause
        time.sleep(pause)
        return self.env.step(action_text)


def latency_factory(make_env, median_s: float, p99_s: float):
    """Builds ``LatencyEnv``s, the k-th with seed k (``reset_count`` starts it again at 0);
    ``factory.slept()``: the seconds all of them have slept."""
    count, built = [0], []

    def factory():
        count[0] += 1
        built.append(LatencyEnv(make_env(), count[0], median_s, p99_s))
        return built[-1]

    factory.reset_count = lambda: count.__setitem__(0, 0)
    factory.slept = lambda: sum(env.slept for env in built)
    return factory


def measure(engines: dict, tasks, group_size: int, rounds: int, depth: int, factory) -> dict:
    """Rolls out ``rounds`` rounds of ``depth`` batches with each engine (alternating): the
    synchronous engine one batch per ``collect``, the slot engine a round's batches in one
    (trajectories queue for slots). Per engine its timings, records, wall time and the seconds
    its environments slept."""
    out = {name: dict(timings=RolloutTimings(), records=[], wall=0.0, slept=0.0) for name in engines}
    for i in range(rounds):
        batches = [tasks(1 + i * depth + j) for j in range(depth)]
        for name, engine in engines.items():
            factory.reset_count()
            t0, slept = time.perf_counter(), factory.slept()
            for work in ([sum(batches, [])] if name == "slots" else batches):
                out[name]["records"] += engine.collect(work, group_size, jax.random.key(i), out[name]["timings"])
            out[name]["wall"] += time.perf_counter() - t0
            out[name]["slept"] += factory.slept() - slept
    return out


def compile_count() -> int:
    """Programs compiled so far by the sampler's jitted functions (both engines)."""
    return sum(f._cache_size() for f in (jit_generate, jit_decode_slots, jit_prefill_slots))


def summary(m: dict, workers: int) -> dict:
    """An engine's rates; ``pool_bound_share``: the least time its environment steps could
    take on the pool's ``workers`` threads (their slept seconds / workers) over its wall time,
    i.e. how close it runs to the pool's capacity (1: the environments are the bottleneck)."""
    records, wall, t = m["records"], m["wall"], m["timings"]
    steps = sum(r.num_steps for r in records)
    generated = sum(e - s for r in records for s, e in r.step_spans)
    return dict(trajectories=len(records), env_steps=steps, generated_tokens=generated, wall_s=wall,
                env_slept_s=m["slept"], pool_bound_share=m["slept"] / workers / wall,
                env_steps_per_s=steps / wall, generated_tokens_per_s=generated / wall,
                slot_utilisation=t.slot_utilisation,
                time_split={"sampler": t.sampler_s / wall, "env_wait": t.env_s / wall, "glue": t.glue_s / wall},
                success=float(np.mean([r.success for r in records])))


def end_to_end(config: str, seeds: list[int], iterations: int, out_dir: Path) -> dict:
    """Trains the demo synchronously and with max_staleness 1, seed by seed; per mode the mean
    iteration time (first iteration left out) and each seed's initial and final greedy success."""
    modes = {"sync": ["rollout.max_staleness=0"],
             "async": ["rollout.max_staleness=1", "algo.behavior_weight_cap=2"]}
    runs = {mode: [] for mode in modes}
    for seed in seeds:
        for mode, extra in modes.items():
            run_dir = out_dir / f"e2e_{mode}_{seed}"
            cfg = load_config(config, [f"seed={seed}", f"run_dir={run_dir}", f"train.iterations={iterations}",
                                       f"train.eval_every={iterations}", "train.checkpoint_every=100000",
                                       "env.eval_tasks=32", *extra])
            if run_dir.exists():
                shutil.rmtree(run_dir)
            summary = Trainer(cfg, log=lambda _: None).fit()
            records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["iteration"] >= 1]
            times = [r["time/rollout"] + r["time/passes"] + r["time/update"] for r in records]
            runs[mode].append(dict(seed=seed, iteration_s=float(np.mean(times)),
                                   initial_success=summary["initial_success_rate"],
                                   final_success=summary["final_success_rate"],
                                   dropped_stale=float(sum(r.get("rollout/dropped_stale", 0) for r in records))))
            print(f"{mode:>5} seed {seed}: {runs[mode][-1]}")
    mean = {mode: float(np.mean([r["iteration_s"] for r in rs])) for mode, rs in runs.items()}
    return dict(async_speedup=mean["sync"] / mean["async"], iterations=iterations, iteration_s=mean,
                final_success={mode: [r["final_success"] for r in rs] for mode, rs in runs.items()}, runs=runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3,
                        help="batches per round: the slot engine's queue of trajectories (1: one batch at a time)")
    parser.add_argument("--slots", type=int, default=0, help="decode slots of the slot engine (0: one per trajectory)")
    parser.add_argument("--decode-rows", type=int, default=0,
                        help="replies the slot engine decodes at once (0: every slot)")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per slot per sampler call")
    parser.add_argument("--decode-widths", type=int, default=16, help="compiled decode widths of the slot engine")
    parser.add_argument("--median-ms", type=float, default=50.0)
    parser.add_argument("--p99-ms", type=float, default=1000.0)
    parser.add_argument("--out", default="benchmarks/out/rollout.json")
    parser.add_argument("--end-to-end", action="store_true", help="also train the demo sync vs async")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--skip-rollout", action="store_true", help="only the end-to-end runs (kept keys merged)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.skip_rollout:
        result = json.loads(out.read_text()) if out.exists() else {}
        result["end_to_end"] = end_to_end(args.config, args.seeds, args.iterations, out.parent)
        result["async_speedup"] = result["end_to_end"]["async_speedup"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"async_speedup x{result['async_speedup']:.2f}; wrote {out}")
        return
    cfg = load_config(args.config)
    rt = Runtime.create(cfg)
    models, params = build_models(cfg, len(rt.tokenizer), rt.mesh)
    if cfg.model.warm_start:
        params["policy"] = load_policy_params(cfg.model.warm_start, params["policy"])
    r = cfg.rollout
    B = r.tasks_per_iter * r.group_size
    policy = nnx.merge(models.policy_def, params["policy"])
    factory = latency_factory(rt.env_factory(), args.median_ms / 1000, args.p99_ms / 1000)
    slots = args.slots or B
    sync_sampler = rt.sampler(policy, B)
    slot_sampler = Sampler(policy, **{**{f: getattr(sync_sampler, f) for f in ("capacity", "max_new_tokens",
                                                                               "sampling", "prefill_chunk")},
                                      "batch_size": slots, "mesh": rt.sample_mesh,
                                      "decode_rows": args.decode_rows or None,
                                      "decode_widths": args.decode_widths})
    engines = {"sync": RolloutEngine(factory, rt.tokenizer, sync_sampler, rt.settings(), rt.pool),
               "slots": SlotEngine(factory, rt.tokenizer, slot_sampler, rt.settings(), rt.pool, chunk=args.chunk)}
    tasks = TaskBatches(task_split(cfg.env, rt.env_factory()()).train, r.tasks_per_iter, cfg.seed)
    measure(engines, lambda i: tasks(1000 + i), r.group_size, 1, args.depth, factory)  # compile
    t0 = time.perf_counter()  # and every other shape a slot-engine call can take
    programs = slot_sampler.warm_up(args.chunk)
    print(f"slot sampler warm-up: {programs} programs in {time.perf_counter() - t0:.0f}s")
    compiled = compile_count()
    load = os.getloadavg()[0]
    measured = measure(engines, tasks, r.group_size, args.rounds, args.depth, factory)
    runs = {name: summary(m, rt.pool.num_workers) for name, m in measured.items()}
    compiled = compile_count() - compiled
    sync, slot = runs["sync"], runs["slots"]
    records = measured["sync"]["records"]
    steps = sum(x.num_steps for x in records)
    prompt = np.mean([x.step_spans[0][0] for x in records if x.step_spans])
    reply = sum(e - s for x in records for s, e in x.step_spans) / max(steps, 1)
    gaps = [x.step_spans[k + 1][0] - x.step_spans[k][1] for x in records for k in range(len(x.step_spans) - 1)]
    obs = float(np.mean(gaps)) if gaps else 0.0
    replies = [e - s for x in records for s, e in x.step_spans]
    result = dict(date=time.strftime("%Y-%m-%d"), machine=platform.machine(), cpus=os.cpu_count(),
                  load_average_before=load, load_average_after=os.getloadavg()[0],
                  env_latency={"median_ms": args.median_ms, "p99_ms": args.p99_ms, "workers": rt.pool.num_workers},
                  slots=slots, decode_rows=slot_sampler.decode_rows, decode_widths=args.decode_widths,
                  decode_chunk=args.chunk, rounds=args.rounds,
                  depth=args.depth, compiled_while_measuring=compiled,
                  slot_utilisation=slot["slot_utilisation"], slot_utilisation_sync=sync["slot_utilisation"],
                  env_steps_speedup=slot["env_steps_per_s"] / sync["env_steps_per_s"], engines=runs,
                  reply_tokens={"mean": float(np.mean(replies)), "p50": float(np.median(replies)),
                                "p90": float(np.percentile(replies, 90)), "max": int(np.max(replies))},
                  mean_prompt=float(prompt), mean_reply=float(reply), mean_observation=obs, layouts=[])
    for name, run in runs.items():
        print(f"{name:>5}: {run['trajectories']} trajectories, {run['env_steps']} env steps in {run['wall_s']:.2f}s: "
              f"{run['env_steps_per_s']:.1f} env steps/s, {run['generated_tokens_per_s']:.0f} tokens/s, "
              f"slot utilisation {run['slot_utilisation']:.1%}, {run['pool_bound_share']:.0%} of the "
              f"environment pool's capacity; "
              + ", ".join(f"{k} {v:.0%}" for k, v in run["time_split"].items()))
    print(f"env steps/s: slots / sync = x{result['env_steps_speedup']:.2f}; "
          f"slot utilisation {slot['slot_utilisation']:.1%} (sync {sync['slot_utilisation']:.1%}); "
          f"load average {load:.1f} -> {result['load_average_after']:.1f} on {os.cpu_count()} CPUs; "
          f"{compiled} programs compiled while measuring")
    print(f"mean prompt {prompt:.0f}, reply {reply:.1f}, observation {obs:.1f} tokens")
    for k in (5, 10, 20):
        packed = prompt + k * reply + (k - 1) * obs
        rows = sum(prompt + j * (reply + obs) + reply for j in range(k))
        result["layouts"].append(dict(steps=k, packed_tokens=packed, per_step_rows_tokens=rows, ratio=rows / packed))
        print(f"{k:>3} steps: packed {packed:7.0f} tokens/trajectory, per-step rows {rows:7.0f}  (x{rows / packed:.1f})")
    if args.end_to_end:
        result["end_to_end"] = end_to_end(args.config, args.seeds, args.iterations, out.parent)
        result["async_speedup"] = result["end_to_end"]["async_speedup"]
        print(f"async_speedup x{result['async_speedup']:.2f}")
    elif out.exists():  # an earlier end-to-end run's keys are kept
        earlier = json.loads(out.read_text())
        result.update({k: earlier[k] for k in ("end_to_end", "async_speedup") if k in earlier})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
