"""Environments that live in worker processes, for CPU-bound ones (a GIL-free ``EnvPool``).

``ProcessEnvs(factory, workers)`` starts ``workers`` processes (spawned: they import the
environment code, never JAX state). ``make()`` builds an environment inside one of them
(round robin) and returns a ``RemoteEnv`` proxy whose ``reset``/``step`` run there, each call
on its own thread of the worker, so a hung call holds up nothing else. The proxies go through
the ordinary ``EnvPool``, whose threads wait on them: its per-call timeouts and failure
isolation apply unchanged (an exception in an environment comes back as ``RemoteError``
naming the original). ``factory`` must be picklable (a module-level class or function, or a
``functools.partial`` of one).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import traceback
from typing import Any, Callable


class RemoteError(RuntimeError):
    """An environment call raised in its worker process; the message names the original error."""


def _serve(conn, factory: Callable[[], Any]) -> None:
    """A worker's loop: requests (id, env id, method, args) in, (id, value, error) out."""
    envs: dict[int, Any] = {}
    lock = threading.Lock()

    def call(req: int, env_id: int, method: str, args: tuple) -> None:
        try:
            if method == "make":
                envs[env_id] = factory()
                value, error = None, None
            else:
                value, error = getattr(envs[env_id], method)(*args), None
        except Exception as err:  # noqa: BLE001 - sent back, fails only that call
            where = traceback.extract_tb(err.__traceback__)[-1]
            value, error = None, f"{type(err).__name__}: {err} (at {where.filename}:{where.lineno} in {where.name})"
        with lock:
            conn.send((req, value, error))

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        req, env_id, method, args = message
        if method == "drop":
            envs.pop(env_id, None)
            continue
        threading.Thread(target=call, args=(req, env_id, method, args), daemon=True).start()


class _Worker:
    """The parent's end of one worker process: sends requests, a reader thread routes replies."""

    def __init__(self, factory: Callable[[], Any], context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, factory), daemon=True, name="steppo-env-process")
        self.process.start()
        child.close()
        self.lock = threading.Lock()
        self.waiting: dict[int, list] = {}  # request id -> [event, value, error]
        self.dropped: list[int] = []  # environments whose proxies are gone, forgotten on the next send
        threading.Thread(target=self._read, daemon=True, name="steppo-env-reader").start()

    def _read(self) -> None:
        while True:
            try:
                req, value, error = self.conn.recv()
            except (EOFError, OSError):
                error = "the environment's worker process exited"
                for slot in list(self.waiting.values()):
                    slot[1:] = [None, error]
                    slot[0].set()
                return
            slot = self.waiting.pop(req)
            slot[1:] = [value, error]
            slot[0].set()

    def call(self, req: int, env_id: int, method: str, args: tuple = ()) -> Any:
        slot = [threading.Event(), None, None]
        self.waiting[req] = slot
        with self.lock:
            while self.dropped:
                self.conn.send((0, self.dropped.pop(), "drop", ()))
            self.conn.send((req, env_id, method, args))
        slot[0].wait()
        if slot[2] is not None:
            raise RemoteError(slot[2])
        return slot[1]


class RemoteEnv:
    """A proxy of an environment living in a worker process (``ProcessEnvs.make``)."""

    def __init__(self, owner: "ProcessEnvs", worker: _Worker, env_id: int):
        self._owner, self._worker, self._id = owner, worker, env_id
        worker.call(owner._next_request(), env_id, "make")

    def reset(self, task_id, seed):
        return self._worker.call(self._owner._next_request(), self._id, "reset", (task_id, seed))

    def step(self, action_text):
        return self._worker.call(self._owner._next_request(), self._id, "step", (action_text,))

    def __del__(self):
        self._worker.dropped.append(self._id)  # not sent from here: a finalizer may run mid-send


class ProcessEnvs:
    """``workers`` processes that build (``make``) and run environments from ``factory``."""

    def __init__(self, factory: Callable[[], Any], workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(factory, context) for _ in range(workers)]
        self._ids, self._requests = itertools.count(1), itertools.count(1)
        self._lock = threading.Lock()

    def _next_request(self) -> int:
        with self._lock:
            return next(self._requests)

    def make(self) -> RemoteEnv:
        with self._lock:
            env_id = next(self._ids)
        return RemoteEnv(self, self._workers[env_id % len(self._workers)], env_id)

    def close(self) -> None:
        for worker in self._workers:
            worker.conn.close()
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
