"""Run many environments' ``reset``/``step`` concurrently, each call under a timeout.

``run`` waits for a batch of calls; ``submit`` and ``wait`` let the caller go on (decoding,
say) while calls run, and collect each as it finishes.

An exception or a timeout in one call fails only that call: its :class:`CallResult` carries the
reason and the caller ends that trajectory as failed; the rest of the batch goes on. A call that
hangs cannot be killed in Python, so its worker thread is abandoned (it is a daemon thread and
never blocks interpreter exit) and a fresh worker replaces it. An environment whose call timed
out may still be running: never reuse it.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from typing import Any, Callable, Generic, Sequence, TypeVar

from steppo_jax.envs.base import Environment, Reset, StepResult

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CallResult(Generic[T]):
    """One call's outcome: ``value`` when ``ok``, else ``error`` says why it failed."""

    value: T | None
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class Call(Generic[T]):
    """The handle of a submitted call (``EnvPool.submit``); ``result()`` once it is finished."""

    def __init__(self, fn: Callable[[], T]):
        self.fn = fn
        self.started: float | None = None
        self.finished = False
        self.abandoned = False
        self.value: Any = None
        self.error: str | None = None
        self.seconds = 0.0

    def result(self) -> CallResult[T]:
        if not self.finished:
            raise RuntimeError("the call has not finished: EnvPool.wait for it first")
        return CallResult(self.value, self.error, self.seconds)


class EnvPool:
    """A pool of daemon worker threads for environment calls.

    num_workers: calls running at once. timeout_s: limit on one call, measured from when it
    starts running (time spent queued does not count).
    """

    def __init__(self, num_workers: int = 8, timeout_s: float = 60.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.num_failures = 0
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._closed = False
        self.num_workers = num_workers
        for _ in range(num_workers):
            self._spawn_worker()

    def _spawn_worker(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="steppo-env-worker").start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._cond:
                job.started = time.monotonic()
                self._cond.notify_all()
            try:
                value, error = job.fn(), None
            except Exception as err:  # noqa: BLE001 - any env failure ends only its trajectory
                value = None
                where = traceback.extract_tb(err.__traceback__)[-1]
                error = (f"{type(err).__name__}: {err} "
                         f"(at {where.filename}:{where.lineno} in {where.name})")
            with self._cond:
                if job.abandoned:
                    return  # a replacement worker already took this thread's place
                job.value, job.error = value, error
                job.seconds = time.monotonic() - job.started
                job.finished = True
                self.num_failures += error is not None
                self._cond.notify_all()

    def submit(self, fn: Callable[[], T]) -> "Call[T]":
        """Queues the zero-argument ``fn``; returns its handle at once (see ``wait``)."""
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        job = Call(fn)
        self._queue.put(job)
        return job

    def wait(self, calls: Sequence["Call"], timeout: float | None = None) -> list["Call"]:
        """The finished calls of ``calls`` (a call past its time limit is finished as failed),
        waiting until at least one is, or ``timeout`` seconds (0: just look; None: no limit).
        Read a finished call's outcome with ``result``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                for job in calls:
                    if not job.finished and job.started is not None and now - job.started >= self.timeout_s:
                        job.abandoned = job.finished = True
                        job.seconds = now - job.started
                        job.error = f"TimeoutError: call exceeded {self.timeout_s:g} s"
                        self.num_failures += 1
                        self._spawn_worker()
                done = [j for j in calls if j.finished]
                if done or not calls or (end is not None and now >= end):
                    return done
                deadlines = [j.started + self.timeout_s for j in calls if j.started is not None]
                if end is not None:
                    deadlines.append(end)
                self._cond.wait(timeout=max(min(deadlines) - now, 0.0) if deadlines else None)

    def run(self, calls: Sequence[Callable[[], T]]) -> list[CallResult[T]]:
        """Run the zero-argument ``calls`` concurrently; results in the same order."""
        jobs = [self.submit(fn) for fn in calls]
        pending = list(jobs)
        while pending:
            finished = set(map(id, self.wait(pending)))
            pending = [j for j in pending if id(j) not in finished]
        return [j.result() for j in jobs]

    def reset(self, envs: Sequence[Environment], task_ids: Sequence[int],
              seeds: Sequence[int]) -> list[CallResult[Reset]]:
        """``env.reset(task_id, seed)`` for each triple, concurrently."""
        if not len(envs) == len(task_ids) == len(seeds):
            raise ValueError(f"envs, task_ids and seeds differ in length: "
                             f"{len(envs)}, {len(task_ids)}, {len(seeds)}")
        return self.run([lambda e=e, t=t, s=s: e.reset(t, s)
                         for e, t, s in zip(envs, task_ids, seeds)])

    def step(self, envs: Sequence[Environment],
             actions: Sequence[str]) -> list[CallResult[StepResult]]:
        """``env.step(action)`` for each pair, concurrently."""
        if len(envs) != len(actions):
            raise ValueError(f"envs and actions differ in length: {len(envs)}, {len(actions)}")
        return self.run([lambda e=e, a=a: e.step(a) for e, a in zip(envs, actions)])

    def close(self) -> None:
        """Stop the idle workers (a hung call's thread is left to finish on its own)."""
        if not self._closed:
            self._closed = True
            for _ in range(self.num_workers):
                self._queue.put(None)

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
