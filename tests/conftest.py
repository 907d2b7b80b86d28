"""Shared fixtures, and one persistent compilation cache for the whole test session."""

import functools
import os
import tempfile

# Set before JAX starts, and inherited by the xdist workers and by the subprocesses tests
# start: the tiny models compile the same programs in many tests (a third less time). An
# explicit JAX_COMPILATION_CACHE_DIR wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "steppo_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def variant(request):
    """Runs a kernel eagerly or under jit (static keyword arguments bound first)."""

    def wrap(fn, **static):
        f = functools.partial(fn, **static)
        return jax.jit(f) if request.param else f

    return wrap
