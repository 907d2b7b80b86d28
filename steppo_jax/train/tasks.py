"""Which tasks a run trains on and which it holds out, and the batch of each iteration.

An environment whose tasks come from a finite source with its own held-out part declares its
``task_split`` (hotpotqa: the records of a train file, then those of an eval file); every id of
any other environment names a generated task, and the run trains on ids [0, env.train_tasks)
and evaluates on the ids right after them. The two ranges are checked disjoint at start-up.

Training batches are a grain pipeline over the training ids, reshuffled every epoch: batch i is
a pure function of (seed, i), so a resumed run picks up at exactly the batch it would have drawn.
"""

from __future__ import annotations

import grain

from steppo_jax.envs import Environment, TaskSplit
from steppo_jax.train.config import ConfigError, EnvSection

GENERATED_TRAIN_TASKS = 10_000
"""Training ids of a generated environment when ``env.train_tasks`` is null."""


def _has_own_split(env: Environment) -> bool:
    return getattr(type(env), "task_split", None) is not None


def task_split(env_cfg: EnvSection, env: Environment) -> TaskSplit:
    """The run's training ids and its ``env_cfg.eval_tasks`` held-out ids, for environment ``env``
    (one instance built from the run's config); raises ``ConfigError`` naming the field to fix."""
    if not _has_own_split(env):
        train = range(GENERATED_TRAIN_TASKS if env_cfg.train_tasks is None else env_cfg.train_tasks)
        return TaskSplit(train=train, eval=range(train.stop, train.stop + env_cfg.eval_tasks))
    try:
        split = env.task_split
    except ValueError as err:
        raise ConfigError(f"env.options: {err}") from None
    if env_cfg.train_tasks is not None and env_cfg.train_tasks > len(split.train):
        raise ConfigError(f"env.train_tasks={env_cfg.train_tasks} exceeds the {len(split.train)} training "
                          f"tasks of environment {env.name!r}")
    if env_cfg.eval_tasks > len(split.eval):
        raise ConfigError(f"env.eval_tasks={env_cfg.eval_tasks} exceeds the {len(split.eval)} held-out "
                          f"tasks of environment {env.name!r}")
    train = split.train if env_cfg.train_tasks is None else split.train[:env_cfg.train_tasks]
    return TaskSplit(train=train, eval=split.eval[:env_cfg.eval_tasks])


def demo_tasks(env_cfg: EnvSection, env: Environment, first: int, count: int) -> list[int]:
    """Task ids of ``count`` SFT demonstrations, never held-out ones: ids ``first, first + 1, ...``
    of a generated environment, or training ids from position ``first`` on (wrapping around) of
    an environment with its own split, whose ids past its source name no task."""
    split = task_split(env_cfg, env)
    if _has_own_split(env):
        return [split.train[(first + k) % len(split.train)] for k in range(count)]
    if first < split.eval.stop and split.eval.start < first + count:
        raise ConfigError(f"sft.seed_offset={first}: demonstration ids {first}..{first + count - 1} include "
                          f"held-out ids {split.eval.start}..{split.eval.stop - 1}")
    return list(range(first, first + count))


class TaskBatches:
    """Batch ``i`` -> ``tasks_per_iter`` (task_id, seed) pairs of ``train_ids`` (random access,
    resumable). An epoch is ``len(train_ids) // tasks_per_iter`` batches of distinct ids, the
    last partial batch dropped; each epoch has its own order."""

    def __init__(self, train_ids: range, tasks_per_iter: int, seed: int):
        if len(train_ids) < tasks_per_iter:
            raise ValueError(f"{len(train_ids)} training tasks cannot fill a batch of {tasks_per_iter}")
        self.seed, self.tasks_per_iter = seed, tasks_per_iter
        self.batches_per_epoch = len(train_ids) // tasks_per_iter
        # index e * len + j of a shuffled MapDataset is position j of epoch e's own permutation
        self._ids = grain.MapDataset.range(train_ids.start, train_ids.stop).shuffle(seed=seed)

    def __call__(self, i: int) -> list[tuple[int, int]]:
        epoch, batch = divmod(i, self.batches_per_epoch)
        first = epoch * len(self._ids) + batch * self.tasks_per_iter
        return [(int(self._ids[first + k]), self.seed) for k in range(self.tasks_per_iter)]


def eval_tasks(split: TaskSplit, seed: int) -> list[tuple[int, int]]:
    """The held-out (task_id, seed) pairs of ``split``."""
    return [(t, seed) for t in split.eval]
