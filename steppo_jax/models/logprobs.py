"""Per-token log-probabilities of a sequence under logits (the trainer's convention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) [B,T] float32 from logits [B,T,V].

    out[:, t] reads logits[:, t-1] (the prediction made before token t); out[:, 0] = 0. The
    distribution is softmax(logits / temperature), untruncated: top-k/top-p do not change it.
    """
    scaled = logits[:, :-1].astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    # a masked sum, not a gather: works unchanged when the vocabulary axis is sharded
    hit = jnp.arange(logp.shape[-1]) == tokens[:, 1:, None]
    picked = jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)
    return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)
