"""Environment variables for a test process that fakes several CPU devices (import before jax).

XLA's CPU client runs every fake device's part of a program on shared pools of
max(cores, devices) threads, and an all-reduce holds its thread until every device arrives.
With 8 fake devices on a loaded 2-core machine, training runs aborted after 40 s with 7 of 8
participants arrived and no longer timeout helping: as far as we can tell the 8th device's
work was starved of a thread. A pool several times larger than the device count
(``PJRT_NPROC``, read by XLA when the client is made) leaves threads free for the device that
is behind.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fake_cpu_devices(n: int) -> dict[str, str]:
    """The variables that give a process ``n`` CPU devices with room to run their collectives."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "PJRT_NPROC": str(max(32, 4 * n)),
            "JAX_PLATFORMS": "cpu"}


def subprocess_env(n: int) -> dict[str, str]:
    """``os.environ`` plus ``fake_cpu_devices(n)``, with the repository on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **fake_cpu_devices(n), "PYTHONPATH": path}
