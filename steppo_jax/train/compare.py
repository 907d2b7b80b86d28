"""``steppo compare``: a grid of credit methods x seeds on one config, run and summarised.

    steppo compare --config configs/default.yaml --methods step_gae,token_gae,grpo \\
        --seeds 0,1,2 --out runs/compare --jobs 2

Every cell is one ``steppo train`` run in ``OUT/<method>/seed<k>/``: the same config, warm
start, tasks, sampling budget and update count, with only the method's ``algo`` fields and the
seed changed. The grid is resumable: a finished cell (``summary.json`` at the config's last
iteration) is skipped, a killed one resumes from its checkpoint, and methods or seeds can be
added to a grid later. ``OUT/grid.json`` records the grid's config; a directory holding another
grid's cells is refused, never overwritten. The summary — ``compare.json``, ``compare.md`` and
``compare.png`` — is rebuilt from the cells' files alone (:func:`summarise`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from steppo_jax.train.config import Config, ConfigError, config_to_dict, load_config
from steppo_jax.train.metrics import METRICS_FILE, SUMMARY_FILE, progress, read_metrics
from steppo_jax.train.storage import write_atomic

METHODS: dict[str, tuple[str, ...]] = {
    # StepPO: step-level GAE with the critic read at step boundaries, step (geometric) ratios
    "step_gae": ("algo.estimator=step_gae", "algo.policy_loss=step", "algo.ratio=geometric"),
    # the baselines, each with token-level PPO ratios
    "token_gae": ("algo.estimator=token_gae", "algo.policy_loss=token", "algo.ratio=geometric"),
    "grpo": ("algo.estimator=grpo", "algo.policy_loss=token", "algo.ratio=geometric"),
    "rloo": ("algo.estimator=rloo", "algo.policy_loss=token", "algo.ratio=geometric"),
    "reinforce_pp": ("algo.estimator=reinforce_pp", "algo.policy_loss=token", "algo.ratio=geometric"),
    "gigpo": ("algo.estimator=gigpo", "algo.policy_loss=token", "algo.ratio=geometric"),
    # the paper's ablations: credit and ratio levels crossed, and the exact step ratio
    "step_gae_token_ratio": ("algo.estimator=step_gae", "algo.policy_loss=token", "algo.ratio=geometric"),
    "token_gae_step_ratio": ("algo.estimator=token_gae", "algo.policy_loss=step", "algo.ratio=geometric"),
    "step_gae_product_ratio": ("algo.estimator=step_gae", "algo.policy_loss=step", "algo.ratio=product"),
}
"""Method name -> the config overrides that define it (only ``METHOD_FIELDS`` change)."""

METHOD_FIELDS = ("algo.estimator", "algo.policy_loss", "algo.ratio")
CELL_FIELDS = (*METHOD_FIELDS, "seed", "run_dir")
"""Fields set per cell; every other field is the grid's and the same in every cell."""

GRID_FILE = "grid.json"


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    run_dir: str


def parse_list(text: str, what: str, cast=str) -> list:
    """``a,b,c`` -> [a, b, c] (duplicates dropped, order kept); a one-line error if empty or bad."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty")
    try:
        items = [cast(t) for t in items]
    except ValueError:
        raise ConfigError(f"--{what} must be a comma-separated list of {cast.__name__}s, got {text!r}") from None
    return list(dict.fromkeys(items))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _grid_fields(cfg: Config) -> dict:
    """The config's fields (flattened, as JSON values) other than those a cell sets."""
    return json.loads(json.dumps({k: v for k, v in _flat(config_to_dict(cfg)).items() if k not in CELL_FIELDS}))


@functools.cache
def _default_fields() -> dict:
    """``_grid_fields`` of a config left at every default."""
    return _grid_fields(load_config(None, []))


class Grid:
    """The cells of one comparison and their run directory ``out``."""

    def __init__(self, config: str, methods: Sequence[str], seeds: Sequence[int], out: str,
                 overrides: Sequence[str] = ()):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        fixed = [o for o in overrides if o.split("=", 1)[0].strip() in CELL_FIELDS]
        if fixed:
            raise ConfigError(f"override {fixed[0]!r} would change a field the grid sets per cell "
                              f"({', '.join(CELL_FIELDS)}): use --methods, --seeds and --out")
        self.config, self.overrides, self.out = config, list(overrides), out
        self.fields = _grid_fields(load_config(config, self.overrides))  # validates the config once
        # seed-major: a grid cut short has every method at the same number of seeds
        self.cells = [Cell(m, s, os.path.join(out, m, f"seed{s}")) for s in seeds for m in methods]

    def cell_overrides(self, cell: Cell) -> list[str]:
        return [*self.overrides, *METHODS[cell.method], f"seed={cell.seed}", f"run_dir={cell.run_dir}"]

    def cell_config(self, cell: Cell) -> Config:
        return load_config(self.config, self.cell_overrides(cell))

    def claim(self) -> None:
        """Creates ``out`` for this grid, or checks that it already belongs to it: a one-line
        ConfigError (and nothing written) for a directory of another grid or of something else."""
        path = os.path.join(self.out, GRID_FILE)
        if os.path.isfile(path):
            try:
                recorded = json.load(open(path, encoding="utf-8"))["fields"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path} is not a grid file of steppo compare") from None
            # a field the config gained after the grid was recorded counts as its default there:
            # cells run before it existed behaved as its default does
            recorded = {**{k: v for k, v in _default_fields().items() if k in self.fields}, **recorded}
            diff = sorted(k for k in set(recorded) | set(self.fields) if recorded.get(k) != self.fields.get(k))
            if diff:
                k = diff[0]
                raise ConfigError(f"{self.out} holds the cells of another grid: {k} is {recorded.get(k)!r} there, "
                                  f"{self.fields.get(k)!r} here ({len(diff)} field(s) differ); choose another --out")
        elif os.path.isdir(self.out) and os.listdir(self.out):
            raise ConfigError(f"{self.out} is not empty and holds no {GRID_FILE}: not a steppo compare directory")
        for cell in self.cells:  # cells run before the grid file existed, or edited since
            saved = os.path.join(cell.run_dir, "config.yaml")
            if os.path.isfile(saved) and _grid_fields(load_config(saved)) != self.fields:
                raise ConfigError(f"{cell.run_dir} was run with another config than this grid's; choose another --out")
        write_atomic(path, json.dumps({"config": self.config, "overrides": self.overrides, "fields": self.fields},
                                      indent=1))

    def finished(self, cell: Cell) -> bool:
        path = os.path.join(cell.run_dir, SUMMARY_FILE)
        if not os.path.isfile(path):
            return False
        summary = json.load(open(path, encoding="utf-8"))
        return summary.get("iterations") == self.fields["train.iterations"] and "final_success_rate" in summary

    def command(self, cell: Cell) -> list[str]:
        resume = ["--resume"] if os.path.isdir(os.path.join(cell.run_dir, "checkpoints")) else []
        return [sys.executable, "-m", "steppo_jax.cli", "train", "--config", self.config, *resume,
                *self.cell_overrides(cell)]


def run_grid(grid: Grid, jobs: int = 1, log=print) -> list[Cell]:
    """Runs the grid's unfinished cells, ``jobs`` at a time, each a ``steppo train`` process
    whose output goes to ``<run_dir>.log``; returns the cells that failed."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    grid.claim()
    todo = [c for c in grid.cells if not grid.finished(c)]
    log(f"{len(grid.cells) - len(todo)} of {len(grid.cells)} cells already finished; running {len(todo)}, "
        f"{jobs} at a time")
    running: list[tuple[Cell, subprocess.Popen, object]] = []
    failed: list[Cell] = []
    with progress(len(todo), "compare") as bar:
        while todo or running:
            while todo and len(running) < jobs:
                cell = todo.pop(0)
                os.makedirs(os.path.dirname(cell.run_dir), exist_ok=True)
                logfile = open(cell.run_dir + ".log", "a", encoding="utf-8")
                running.append((cell, subprocess.Popen(grid.command(cell), stdout=logfile,
                                                       stderr=subprocess.STDOUT), logfile))
            time.sleep(0.5)
            for entry in [e for e in running if e[1].poll() is not None]:
                cell, proc, logfile = entry
                logfile.close()
                running.remove(entry)
                if proc.returncode or not grid.finished(cell):
                    failed.append(cell)
                    bar.write(f"{cell.method} seed {cell.seed}: failed (exit {proc.returncode}), see {cell.run_dir}.log")
                bar.update(1)
    return failed


# -- summary --------------------------------------------------------------------------------

def _t95(n: int) -> float:
    """Two-sided 95% Student t quantile with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def interval(values: Sequence[float]) -> dict:
    """{mean, low, high}: the mean and its 95% t-interval over seeds (the mean itself for one)."""
    x = np.asarray(values, float)
    mean = float(x.mean())
    half = _t95(len(x)) * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half}


def cell_result(run_dir: str, threshold: float) -> dict:
    """One finished cell's figures, from its metrics.jsonl and summary.json: the greedy success
    curve {iteration: success} (0 = the warm start), its area (trapezoid over the iterations,
    divided by their number), the first iteration reaching ``threshold``, the sampled reward
    of the last five iterations, wall time and the run means of the diagnostics."""
    summary = json.load(open(os.path.join(run_dir, SUMMARY_FILE), encoding="utf-8"))
    records = read_metrics(os.path.join(run_dir, METRICS_FILE))
    curve = {int(r["iteration"]) + 1: float(r["eval/success"]) for r in records if "eval/success" in r}
    iters = sorted(curve)
    xs, ys = np.array(iters, float), np.array([curve[i] for i in iters])
    auc = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (xs[-1] - xs[0])) if len(xs) > 1 else float(ys[0])
    reached = next((i for i in iters if curve[i] >= threshold), None)
    train = [r for r in records if "reward/mean" in r]
    return {"curve": curve, "final": float(summary["final_success_rate"]),
            "initial": float(summary["initial_success_rate"]),
            "auc": auc, "iters_to_threshold": reached,
            "reward_last5": float(np.mean([r["reward/mean"] for r in train[-5:]])),
            "wall_s": float(summary["wall_time_s"]),
            "diagnostics": {k: _mean([r.get(k) for r in train]) for k in (
                "value/explained_var", "policy/clip_frac", "adv/std", "policy/kl", "policy/entropy", "tokens/action")}}


def summarise(grid: Grid, threshold: float = 0.9) -> dict:
    """compare.json, compare.md and compare.png in the grid directory, from the finished cells;
    returns the compare.json object."""
    methods: dict[str, dict] = {}
    for cell in filter(grid.finished, grid.cells):
        entry = methods.setdefault(cell.method, {"overrides": list(METHODS[cell.method]), "seeds": {}})
        entry["seeds"][str(cell.seed)] = cell_result(cell.run_dir, threshold)
    for entry in methods.values():
        runs = list(entry["seeds"].values())
        reached = [r["iters_to_threshold"] for r in runs if r["iters_to_threshold"] is not None]
        entry["final"] = interval([r["final"] for r in runs])
        entry["auc"] = interval([r["auc"] for r in runs])
        entry["reward_last5"] = interval([r["reward_last5"] for r in runs])
        entry["iters_to_threshold"] = {"reached": len(reached), "of": len(runs),
                                       "mean": float(np.mean(reached)) if reached else None}
        entry["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
        entry["diagnostics"] = {k: _mean([r["diagnostics"][k] for r in runs]) for k in runs[0]["diagnostics"]}
    result = {"config": grid.config, "overrides": grid.overrides, "threshold": threshold,
              "cells": len(grid.cells), "finished": sum(len(m["seeds"]) for m in methods.values()),
              "methods": methods}
    write_atomic(os.path.join(grid.out, "compare.json"), json.dumps(result, indent=1))
    write_atomic(os.path.join(grid.out, "compare.md"), table(result))
    plot(result, os.path.join(grid.out, "compare.png"),
         title=f"{os.path.basename(os.path.normpath(grid.out))}: {os.path.basename(grid.config)}")
    return result


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _ci(stat: dict, pct: bool = True) -> str:
    """``mean [low, high]``; a rate's interval is shown clipped to [0, 100]%."""
    if pct:
        low, high = max(stat["low"], 0.0), min(stat["high"], 1.0)
        return f"{100 * stat['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def table(result: dict) -> str:
    """The Markdown table of a compare.json object: one row per method."""
    th = result["threshold"]
    lines = [f"| method | seeds | final greedy success % (95% CI) | success AUC % | iterations to {th:.0%} "
             "| sampled reward, last 5 it. | critic expl. var | clip frac | adv std | KL to warm start | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name, m in result["methods"].items():
        t, d = m["iters_to_threshold"], m["diagnostics"]
        reach = f"{fmt(t['mean'], '.1f')} ({t['reached']}/{t['of']})"
        lines.append(f"| {name} | {len(m['seeds'])} | {_ci(m['final'])} | {_ci(m['auc'])} | {reach} "
                     f"| {_ci(m['reward_last5'], pct=False)} | {fmt(d['value/explained_var'], '.2f')} "
                     f"| {fmt(d['policy/clip_frac'], '.3f')} | {fmt(d['adv/std'], '.2f')} "
                     f"| {fmt(d['policy/kl'], '.2e')} | {m['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str, title: str = "") -> None:
    """Greedy success over iterations per method: the mean over seeds and a min-max band."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, m in result["methods"].items():
        curves = [c["curve"] for c in m["seeds"].values()]
        iters = sorted(set.intersection(*(set(int(i) for i in c) for c in curves)))
        ys = np.array([[c[i] if i in c else c[str(i)] for i in iters] for c in curves])
        line, = ax.plot(iters, ys.mean(0), marker="o", markersize=3, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(iters, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("greedy success (held-out tasks)")
    ax.set_title(title or os.path.basename(result["config"]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
