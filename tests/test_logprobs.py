"""Chunked log-probs and entropies from hidden states equal the materialised-logits computation
(values and gradients), and their backward pass never holds [B, T, V]."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax import losses
from steppo_jax.models import token_logprobs, token_logprobs_and_entropy


@functools.partial(jax.jit, static_argnames="temperature")
def full(h, w, tokens, temperature):
    """The reference: [B, T, V] logits, today's token_logprobs and losses.entropy."""
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    ent = losses.entropy(logits / temperature)
    return token_logprobs(logits, tokens, temperature), jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent[:, :-1]], 1)


def data(B, T, D, V, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 3.0 / np.sqrt(D)).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    return h, w, tokens, rng.normal(size=(B, T)).astype(np.float32), rng.normal(size=(B, T)).astype(np.float32)


@pytest.mark.parametrize("T,chunk", [(13, 4), (13, 32), (12, 6)], ids=["ragged", "chunk>T", "even"])
def test_chunked_equals_full_values_and_gradients(T, chunk):
    h, w, tokens, a, b = data(3, T, 8, 50)
    temperature = 0.7
    chunked = jax.jit(token_logprobs_and_entropy, static_argnames=("temperature", "chunk", "with_entropy"))
    lp, ent = chunked(h, w, tokens, temperature, chunk=chunk)
    lp_ref, ent_ref = full(h, w, tokens, temperature)
    np.testing.assert_allclose(lp, lp_ref, atol=1e-5)
    np.testing.assert_allclose(ent, ent_ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lp)[:, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(ent)[:, 0], 0.0)

    def functional(fn):  # a random linear functional of both outputs
        return lambda h, w: jnp.sum(a * fn(h, w)[0]) + jnp.sum(b * fn(h, w)[1])

    g = jax.jit(jax.grad(functional(lambda h, w: chunked(h, w, tokens, temperature, chunk=chunk)), (0, 1)))(h, w)
    g_ref = jax.jit(jax.grad(functional(lambda h, w: full(h, w, tokens, temperature)), (0, 1)))(h, w)
    for x, y in zip(g, g_ref):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_without_entropy():
    h, w, tokens, *_ = data(2, 9, 8, 30)
    fn = jax.jit(lambda h, w, t: token_logprobs_and_entropy(h, w, t, 1.3, chunk=4, with_entropy=False))
    lp, ent = fn(h, w, tokens)
    assert ent is None
    np.testing.assert_allclose(lp, full(h, w, tokens, 1.3)[0], atol=1e-5)


def test_backward_memory_is_per_chunk():
    B, T, D, V = 2, 1024, 64, 32768
    args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))

    def temp_bytes(fn):
        loss = lambda h, w, tokens: sum(jnp.sum(x) for x in fn(h, w, tokens))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda h, w, tokens: token_logprobs_and_entropy(h, w, tokens, 0.7, chunk=128))
    materialised = temp_bytes(lambda h, w, tokens: full(h, w, tokens, 0.7))
    assert materialised >= B * T * V * 4  # the reference does hold [B, T, V] float32
    assert chunked < materialised / 4, (chunked, materialised)
