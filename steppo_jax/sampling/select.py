"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from steppo_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (static: a change recompiles).

    temperature > 0 scales logits; top_k = 0 and top_p = 1.0 disable those filters; greedy takes
    the argmax. Reported log-probs are those of the distribution each token was drawn from:
    softmax of the scaled logits with everything top-k/top-p removed set to -inf (renormalised
    over the kept tokens) — the behaviour policy. Without filters that is softmax(logits /
    temperature), the trainer's `token_logprobs`; greedy (no distribution is sampled) reports
    that one too.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def select_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams):
    """logits [B,V], keys [B] (one PRNG key per row) -> (tokens [B] int32, logprobs [B] float32).

    The log-prob of a sampled token is under the truncated, renormalised distribution it was
    drawn from (see `SamplingParams`). Row b's token depends on its own logits and key only,
    not on the other rows."""
    # [B, V] is small: gather the vocabulary so sort/top-k/categorical see whole rows
    scaled = constrain(logits.astype(jnp.float32), ("batch", None)) / params.temperature
    if params.greedy:
        logp = jax.nn.log_softmax(scaled, axis=-1)
        tokens = jnp.argmax(scaled, axis=-1)
    else:
        masked = scaled
        if params.top_k:
            kth = jax.lax.top_k(scaled, params.top_k)[0][:, -1:]
            masked = jnp.where(scaled < kth, -jnp.inf, masked)
        if params.top_p < 1.0:
            desc = -jnp.sort(-masked, axis=-1)
            probs = jax.nn.softmax(desc, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
            kept = jnp.where(before < params.top_p, desc, jnp.inf)
            threshold = jnp.min(kept, axis=-1, keepdims=True)
            masked = jnp.where(masked < threshold, -jnp.inf, masked)
        logp = jax.nn.log_softmax(masked, axis=-1)  # -inf off the kept tokens
        keys = constrain(keys, ("batch",))
        tokens = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = tokens.astype(jnp.int32)
    # a masked sum, not a gather: exact, and its sharding is plain even for a batch of one row
    picked = jnp.arange(logp.shape[-1], dtype=jnp.int32)[None, :] == tokens[:, None]
    return tokens, jnp.sum(jnp.where(picked, logp, 0.0), axis=-1)
