"""Greedy evaluation on held-out tasks."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from steppo_jax.rollout import rollout_stats
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.tasks import eval_tasks


class Evaluator:
    """Greedy rollouts of ``cfg.env.eval_tasks`` held-out tasks, ``batch_size`` at a time."""

    def __init__(self, runtime: Runtime, policy_def, policy_params, batch_size: int = 64):
        cfg = runtime.cfg
        self.runtime = runtime
        self.tasks = eval_tasks(cfg.env.eval_seed, cfg.env.eval_tasks, cfg.seed)
        self.batch_size = min(batch_size, len(self.tasks))
        n_dev = runtime.mesh.shape["data"] * runtime.mesh.shape["fsdp"]
        self.batch_size = -(-self.batch_size // n_dev) * n_dev
        self.sampler = runtime.sampler(nnx.merge(policy_def, policy_params), self.batch_size, greedy=True)
        self.engine = runtime.engine(self.sampler)

    def __call__(self, policy_params) -> tuple[dict[str, float], list]:
        """({success, return, steps, failed}: means over the tasks, the trajectory records)."""
        self.sampler.set_params(policy_params)
        records = []
        for start in range(0, len(self.tasks), self.batch_size):
            chunk = self.tasks[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            records += self.engine.collect(padded, 1, jax.random.key(0))[:len(chunk)]
        stats = rollout_stats(records)
        return {"success": float(np.mean([r.success for r in records])), "return": stats.get("return", 0.0),
                "steps": stats.get("steps", 0.0), "failed": stats["failed"]}, records
