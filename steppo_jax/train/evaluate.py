"""Greedy evaluation on held-out tasks (split over the processes of a multi-host run)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from steppo_jax import sharding
from steppo_jax.rollout import STAT_KEYS, stats_table, table_stats
from steppo_jax.train import distributed
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.tasks import eval_tasks


def eval_batch_size(share: int, sample_mesh: jax.sharding.Mesh, batch_size: int = 64) -> int:
    """Rows of the evaluation sampler for a process's ``share`` of the tasks: at most
    ``batch_size``, rounded up to a multiple of the sample mesh's batch shards."""
    n_dev = sharding.batch_shards(sample_mesh)
    return -(-min(batch_size, share) // n_dev) * n_dev


class Evaluator:
    """Greedy rollouts of ``cfg.env.eval_tasks`` held-out tasks, ``batch_size`` at a time.

    Process p of P rolls out the p-th contiguous slice of the tasks (the last task repeated
    to make P equal slices); the stats are over the tasks themselves, gathered from all."""

    def __init__(self, runtime: Runtime, policy_def, policy_params, batch_size: int = 64):
        cfg = runtime.cfg
        self.runtime = runtime
        tasks = eval_tasks(runtime.task_split, cfg.seed)
        self.num_tasks, processes = len(tasks), distributed.process_count()
        share = -(-len(tasks) // processes)
        tasks += [tasks[-1]] * (share * processes - len(tasks))
        self.tasks = tasks[distributed.process_index() * share:][:share]
        self.batch_size = eval_batch_size(share, runtime.sample_mesh, batch_size)
        self.sampler = runtime.sampler(nnx.merge(policy_def, policy_params), self.batch_size, greedy=True)
        self.engine = runtime.engine(self.sampler)

    def __call__(self, policy_params) -> tuple[dict[str, float], list]:
        """({success, return, steps, failed}: means over the tasks, this process's trajectory records)."""
        self.sampler.set_params(self.runtime.to_sample_mesh(policy_params))
        records = []
        for start in range(0, len(self.tasks), self.batch_size):
            chunk = self.tasks[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            records += self.engine.collect(padded, 1, jax.random.key(0))[:len(chunk)]
        self.sampler.release()  # its cache and weights stay allocated only while evaluating
        table = distributed.gather_rows(stats_table(records))[:self.num_tasks]
        stats = table_stats(table)
        return {"success": float(np.mean(table[:, 1 + STAT_KEYS.index("success")])), "return": stats.get("return", 0.0),
                "steps": stats.get("steps", 0.0), "failed": stats["failed"]}, records
