"""EnvPool: concurrency, per-call timeouts, failures isolated to their trajectory."""

import threading
import time

import pytest

from steppo_jax.envs import EnvPool, make


class FlakyEnv:
    """Steps normally, or raises, or hangs, depending on the action text."""

    name, max_steps = "flaky", 3

    def __init__(self):
        self.release = threading.Event()

    def reset(self, task_id, seed):
        if task_id < 0:
            raise ValueError(f"bad task {task_id}")
        return task_id

    def step(self, action_text):
        if action_text == "raise":
            raise RuntimeError("env crashed")
        if action_text == "hang":
            self.release.wait(timeout=30)
            return "late"
        if action_text.startswith("sleep"):
            time.sleep(float(action_text.split()[1]))
        return f"ok:{action_text}"

    def expert_action(self):
        return "ok"


def test_results_keep_order_and_run_concurrently():
    envs = [FlakyEnv() for _ in range(8)]
    with EnvPool(num_workers=8, timeout_s=5) as pool:
        start = time.monotonic()
        results = pool.step(envs, ["sleep 0.3"] * 8)
        elapsed = time.monotonic() - start
    assert [r.value for r in results] == ["ok:sleep 0.3"] * 8
    assert all(r.ok and r.error is None and r.seconds >= 0.29 for r in results)
    assert elapsed < 1.2  # serial would take 2.4 s


def test_exception_and_hang_fail_only_their_trajectory():
    envs = [FlakyEnv() for _ in range(4)]
    with EnvPool(num_workers=4, timeout_s=0.5) as pool:
        start = time.monotonic()
        results = pool.step(envs, ["a", "raise", "hang", "b"])
        elapsed = time.monotonic() - start
        assert [r.ok for r in results] == [True, False, False, True]
        assert [results[0].value, results[3].value] == ["ok:a", "ok:b"]
        assert results[1].error.startswith("RuntimeError: env crashed (at ")
        assert "test_pool.py" in results[1].error and results[1].value is None
        assert results[2].error == "TimeoutError: call exceeded 0.5 s"
        assert elapsed < 2.0
        assert pool.num_failures == 2
        # The hung worker was replaced: a full batch still runs in parallel afterwards.
        start = time.monotonic()
        again = pool.step([FlakyEnv() for _ in range(4)], ["sleep 0.3"] * 4)
        assert all(r.ok for r in again) and time.monotonic() - start < 0.9
    envs[2].release.set()


def test_timeout_counts_from_the_start_of_the_call_not_the_queue():
    envs = [FlakyEnv() for _ in range(4)]
    with EnvPool(num_workers=1, timeout_s=0.5) as pool:
        results = pool.step(envs, ["sleep 0.3"] * 4)  # 1.2 s in total, 0.3 s each
    assert all(r.ok for r in results)


def test_reset_failures_and_length_checks():
    envs = [FlakyEnv(), FlakyEnv()]
    with EnvPool(num_workers=2, timeout_s=1) as pool:
        results = pool.reset(envs, [5, -1], [0, 0])
        assert results[0].value == 5
        assert results[1].error.startswith("ValueError: bad task -1")
        with pytest.raises(ValueError, match="differ in length"):
            pool.reset(envs, [1], [0, 0])
        with pytest.raises(ValueError, match="differ in length"):
            pool.step(envs, ["a"])
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([lambda: 1])


def test_real_environments_through_the_pool():
    envs = [make("multihop_qa") for _ in range(6)]
    with EnvPool(num_workers=3, timeout_s=10) as pool:
        resets = pool.reset(envs, list(range(6)), [0] * 6)
        assert all(r.ok for r in resets)
        done = [False] * 6
        while not all(done):
            active = [i for i in range(6) if not done[i]]
            results = pool.step([envs[i] for i in active],
                                [envs[i].expert_action() for i in active])
            for i, r in zip(active, results):
                assert r.ok
                done[i] = r.value.done or r.value.truncated
                if done[i]:
                    assert r.value.info["success"]


@pytest.mark.parametrize("kwargs, message", [({"num_workers": 0}, "num_workers"),
                                             ({"timeout_s": 0}, "timeout_s")])
def test_bad_pool_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnvPool(**kwargs)


def test_submitted_calls_finish_one_by_one_under_the_timeout():
    envs = [FlakyEnv() for _ in range(3)]
    with EnvPool(num_workers=3, timeout_s=0.5) as pool:
        calls = [pool.submit(lambda e=e, a=a: e.step(a)) for e, a in zip(envs, ["sleep 0.2", "hang", "raise"])]
        first = pool.wait(calls)  # the raise comes back at once, the others later
        assert calls[2] in first and calls[1] not in first
        with pytest.raises(RuntimeError, match="not finished"):
            calls[1].result()
        while not all(c.finished for c in calls):
            pool.wait([c for c in calls if not c.finished])
        results = [c.result() for c in calls]
        assert results[0].value == "ok:sleep 0.2" and results[1].error.startswith("TimeoutError")
        assert results[2].error.startswith("RuntimeError") and pool.num_failures == 2
    envs[1].release.set()


def test_environments_in_worker_processes_fail_alone():
    """env.pool: process: four environments in two worker processes, stepped through the
    ordinary pool; a raise and a hang fail only their calls, also for an environment sharing
    the hung one's process."""
    from steppo_jax.envs import ProcessEnvs, RemoteError

    remote = ProcessEnvs(FlakyEnv, workers=2)
    envs = [remote.make() for _ in range(4)]  # ids 1..4: processes 1, 0, 1, 0
    with EnvPool(num_workers=4, timeout_s=1.0) as pool:
        assert [r.value for r in pool.reset(envs, [5, 6, 7, 8], [0] * 4)] == [5, 6, 7, 8]
        results = pool.step(envs, ["a", "raise", "hang", "b"])
        assert [r.ok for r in results] == [True, False, False, True]
        assert [results[0].value, results[3].value] == ["ok:a", "ok:b"]
        assert results[1].error.startswith(f"{RemoteError.__name__}: RuntimeError: env crashed (at ")
        assert results[2].error == "TimeoutError: call exceeded 1 s"
        again = pool.step([envs[0], envs[3]], ["c", "d"])  # envs[0] shares the hung call's process
        assert [r.value for r in again] == ["ok:c", "ok:d"]
    remote.close()
