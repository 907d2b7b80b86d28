"""Shared fixtures."""

import functools

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def variant(request):
    """Runs a kernel eagerly or under jit (static keyword arguments bound first)."""

    def wrap(fn, **static):
        f = functools.partial(fn, **static)
        return jax.jit(f) if request.param else f

    return wrap
