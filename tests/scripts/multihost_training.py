"""Multi-host training on one machine: ``steppo train`` as 2 processes of 4 host CPU devices
each (``jax.distributed`` on localhost) gives the metrics and final parameters of one process
with 8 devices. With ``--wrong-shard`` it also shows that the check can fail: a run whose
processes all take the first slice of the tasks does not match (a minute more, so not in CI).

    python -m tests.scripts.multihost_training TMP [--wrong-shard]   # prints "multi-host == single process"
    python -m tests.scripts.multihost_training --worker [--wrong-shard] ARGS...   # one process

It trains the demo's configuration (the shipped warm start on multihop_qa, whose sampled
success is about one half, so rewards, advantages and updates are all informative) with a
smaller batch; every task is a different question, so which tasks a process runs shows in
every metric, not only how many it runs.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.devices import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("reward/mean", "success/rate", "steps/mean", "tokens/real", "tokens/processed", "seq_len", "policy/loss",
        "value/loss", "policy/entropy", "policy/clip_frac", "policy/grad_norm", "sampler_logp_gap", "eval/success",
        "eval/return")
ITERATIONS = 2


def worker(args: list[str]) -> int:
    """One ``steppo`` process; ``--wrong-shard`` gives every process the first slice of each
    iteration's tasks."""
    from steppo_jax.cli import main
    from steppo_jax.train.rl import Trainer

    if args[0] == "--wrong-shard":
        args = args[1:]
        Trainer.process_tasks = lambda self, it: self.tasks(it)[:self.local_tasks]
    return main(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train(run_dir: Path, processes: int, *extra: str, iterations: int = ITERATIONS) -> None:
    """``steppo train`` of the demo config as ``processes`` processes sharing 8 CPU devices."""
    args = ["train", "--config", "configs/default.yaml", f"run_dir={run_dir}", "rollout.tasks_per_iter=4",
            "env.eval_tasks=8", f"train.iterations={iterations}", "train.checkpoint_every=100",
            "train.eval_every=100"]
    devices = 8 // processes
    env = subprocess_env(devices)
    if processes > 1:
        env |= {"STEPPO_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
                "JAX_NUM_PROCESSES": str(processes)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.scripts.multihost_training", "--worker", *extra, *args],
                              cwd=ROOT, env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} of {processes} failed:\n{out[-3000:]}"


def results(run_dir: Path):
    """(metrics records by iteration, final parameter leaves) of a finished run."""
    import jax

    from steppo_jax.train.checkpoint import CheckpointManager
    from steppo_jax.train.metrics import read_metrics

    records = {r["iteration"]: r for r in read_metrics(str(run_dir / "metrics.jsonl"))}
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # not the devices it was saved from
    with CheckpointManager(str(run_dir / "checkpoints")) as manager:
        step = manager.latest_step()
        stored = manager._manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), stored)
        state, _ = manager.restore(step, target)
    return records, [np.asarray(x) for x in jax.tree.leaves(state["state"]["params"])]


def compare(single, multi, iterations) -> None:
    (m1, p1), (m2, p2) = single, multi
    for it in iterations:
        for key in KEYS:
            if key in m1[it]:
                np.testing.assert_allclose(m2[it][key], m1[it][key], rtol=2e-3, atol=2e-4, err_msg=f"{key} it {it}")
    if p2 is not None:
        for x, y in zip(p1, p2):
            np.testing.assert_allclose(y, x, atol=2e-4)


def main(tmp: str, wrong_shard: bool) -> None:
    t0 = time.perf_counter()
    tmp = Path(tmp)
    train(tmp / "single", 1)
    print(f"single process {time.perf_counter() - t0:.0f}s", flush=True)
    train(tmp / "multi", 2)
    print(f"two processes {time.perf_counter() - t0:.0f}s", flush=True)
    single = results(tmp / "single")
    rewards = [single[0][it]["reward/mean"] for it in range(ITERATIONS)]
    assert all(0.1 < r < 0.9 for r in rewards), f"uninformative batches (reward/mean {rewards})"
    compare(single, results(tmp / "multi"), range(-1, ITERATIONS))
    print("multi-host == single process")
    if not wrong_shard:
        return
    train(tmp / "wrong", 2, "--wrong-shard", iterations=1)
    try:
        compare(single, (results(tmp / "wrong")[0], None), [0])
    except AssertionError as err:
        print("wrong task sharding detected:", " ".join(str(err).split()[:20]))
    else:
        raise AssertionError("processes running the same tasks gave the metrics of a correct split")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    main(sys.argv[1], wrong_shard=sys.argv[2:] == ["--wrong-shard"])
