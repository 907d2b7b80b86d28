"""Which tasks each iteration trains on: a grain pipeline over task ids.

Training tasks are a seeded shuffle of ids [0, eval_seed); held-out evaluation tasks are
ids from ``eval_seed`` on. Batch i of the pipeline is a pure function of (seed, i), so a
resumed run picks up at exactly the batch it would have drawn.
"""

from __future__ import annotations

import grain
import numpy as np


class TaskBatches:
    """Batch ``i`` -> ``tasks_per_iter`` (task_id, seed) pairs (random access, resumable)."""

    def __init__(self, num_train_tasks: int, tasks_per_iter: int, seed: int):
        if num_train_tasks < tasks_per_iter:
            raise ValueError(f"{num_train_tasks} training tasks cannot fill a batch of {tasks_per_iter}")
        self.seed = seed
        self._ds = grain.MapDataset.range(num_train_tasks).shuffle(seed=seed).batch(tasks_per_iter, drop_remainder=True)

    def __call__(self, i: int) -> list[tuple[int, int]]:
        ids = np.asarray(self._ds[i % len(self._ds)])
        return [(int(t), self.seed) for t in ids]


def eval_tasks(first_id: int, count: int, seed: int) -> list[tuple[int, int]]:
    """The held-out tasks: ids first_id .. first_id + count - 1."""
    return [(first_id + i, seed) for i in range(count)]
