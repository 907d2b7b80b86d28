"""Timing helper shared by the benchmarks."""

import time


def best_time(fn, repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls of fn() (which must block on its result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
