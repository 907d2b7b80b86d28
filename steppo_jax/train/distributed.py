"""Several processes (hosts) in one run: joining them, and the few host-side collectives.

With ``STEPPO_DISTRIBUTED=1`` the CLI calls ``initialize()`` before any other JAX use. After
that ``jax.devices()`` lists every process's devices and the train mesh spans them all, while
each process samples its own share of the batch on its local devices (see
``Runtime.sample_mesh``). Every helper here is the identity in a single process, so the
one-process path runs no collective at all.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


class DistributedError(RuntimeError):
    """The processes of a run could not be joined (bad environment or unreachable coordinator)."""


def initialize() -> None:
    """Joins the run's processes when ``STEPPO_DISTRIBUTED=1`` (else does nothing).

    With ``JAX_COORDINATOR_ADDRESS`` set, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` say how
    many processes there are and which one this is (GPU nodes over ssh, tests on localhost);
    without it JAX detects them itself (Cloud TPU, SLURM, Open MPI). CPU devices talk over gloo.
    """
    if os.environ.get("STEPPO_DISTRIBUTED", "0") in ("", "0"):
        return
    kwargs = {}
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            kwargs = {"coordinator_address": address, "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                      "process_id": int(os.environ["JAX_PROCESS_ID"])}
        except (KeyError, ValueError) as err:
            raise DistributedError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                                   f"integers too ({type(err).__name__}: {err})") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # JAX raises several types (RuntimeError, XlaRuntimeError, ValueError)
        where = f" with coordinator {address}" if address else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(f"jax.distributed.initialize(){where} failed: {first}") from None


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """True on the process that writes the run's files (metrics, plots, summary)."""
    return jax.process_index() == 0


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` [n, ...] (same shape everywhere) concatenated in process order:
    [n * process_count, ...]. Across processes 64-bit values travel as 32-bit ones."""
    if jax.process_count() == 1:
        return x
    narrow = x.astype(np.float32 if x.dtype.kind == "f" else np.int32)
    return np.asarray(multihost_utils.process_allgather(narrow, tiled=True)).astype(x.dtype)


def max_over_processes(values) -> tuple[int, ...]:
    """The elementwise maximum of a tuple of ints over all processes."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
    return tuple(int(v) for v in np.max(gathered, axis=0))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
