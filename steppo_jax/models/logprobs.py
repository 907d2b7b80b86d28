"""Per-token log-probabilities (and entropies) of a sequence: the trainer's convention.

``token_logprobs`` reads materialised logits [B,T,V]; ``token_logprobs_and_entropy`` computes
the same from the final hidden states and the LM head's weight, a chunk of the sequence at a
time, so that neither the forward nor the backward pass ever holds [B,T,V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _picked(z: jax.Array, targets: jax.Array) -> jax.Array:
    """z[..., targets] of z [..., V] and targets [...]: a masked sum, not a gather, so that it
    works unchanged when the vocabulary axis is sharded."""
    hit = jnp.arange(z.shape[-1]) == targets[..., None]
    return jnp.sum(jnp.where(hit, z, 0.0), axis=-1)


def _shift_right(x: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: out[:, t] = x[:, t-1], out[:, 0] = 0."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) [B,T] float32 from logits [B,T,V].

    out[:, t] reads logits[:, t-1] (the prediction made before token t); out[:, 0] = 0. The
    distribution is softmax(logits / temperature), untruncated: top-k/top-p do not change it.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    picked = _picked(logp, tokens[:, 1:])
    return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


def token_logprobs_and_entropy(h: jax.Array, w: jax.Array, tokens: jax.Array, temperature: float = 1.0, *,
                               chunk: int = 512, with_entropy: bool = True):
    """``token_logprobs`` and entropies from hidden states, [B, chunk, V] logits at a time.

    h [B,T,D] final hidden states (compute dtype); w [D,V] LM head weight; tokens [B,T].
    Returns (logp [B,T] float32, entropy [B,T] float32, or None without ``with_entropy``):
    logp[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]] and entropy[:, t] is
    the entropy of that distribution (the one token t was drawn from); both 0 at t = 0.

    The sequence is padded to a multiple of ``chunk`` and scanned; each chunk is rematerialised
    in the backward pass, so memory is O(B x chunk x V) there too. Gradients flow to h and w.
    """
    B, T, D = h.shape
    c = min(chunk, T)
    n = -(-T // c)
    targets = jnp.roll(tokens, -1, axis=1)  # position t predicts token t+1; the last is dropped
    pad = n * c - T
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h_n = h.reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
    targets_n = targets.reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(w, h_c, y_c):
        z = jnp.einsum("bcd,dv->bcv", h_c, w, preferred_element_type=jnp.float32) / temperature
        log_p = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
        logp = _picked(log_p, y_c)
        if not with_entropy:
            return logp, None
        # -sum p log p, not lse - sum p z: the latter cancels badly for peaked distributions
        return logp, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)

    _, (logp, ent) = jax.lax.scan(lambda _, xs: (None, one_chunk(w, *xs)), None, (h_n, targets_n))
    unchunk = lambda x: _shift_right(x.swapaxes(0, 1).reshape(B, n * c)[:, :T])  # noqa: E731
    return unchunk(logp), unchunk(ent) if with_entropy else None
