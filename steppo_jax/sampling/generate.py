"""Pure, jittable multi-turn generation: prefill new tokens into a per-row KV cache, then decode.

Layout: row b's cache holds its whole conversation so far in slots [0, lengths[b]) (slot ==
position, so positions are exactly those of the trainer's packed row). A call appends each
active row's new tokens at its own offset (no left padding; widths are bucketed by the caller),
then decodes with a `lax.while_loop` until every active row has produced a stop token from its
set or `max_new_tokens`. The last sampled token of a row is not yet in the cache: it is kept as
`pending` and prefilled in front of that row's new tokens on the next call, so across calls
the cache always matches every token so far. Inactive rows change nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from steppo_jax.models.config import ModelConfig
from steppo_jax.models.decoder import init_kv
from steppo_jax.sampling.select import SamplingParams, select_tokens
from steppo_jax.sharding import constrain


@struct.dataclass
class DecodeState:
    """Per-row conversation state carried across calls (donate it).

    kv: (k, v), each [B, L, C, K, hd] (rows, layers, cache slots); lengths [B] int32 (tokens in the cache);
    pending [B] int32 (last sampled token, not yet cached); has_pending [B] bool.
    """

    kv: Any
    lengths: jax.Array
    pending: jax.Array
    has_pending: jax.Array


class Generation(NamedTuple):
    """tokens, logprobs [B, max_new] (zero past `lengths`; log-probs under the distribution each
    token was drawn from, see `SamplingParams`); lengths [B]; stopped [B] (ended on a
    stop token rather than on max_new_tokens)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def init_state(config: ModelConfig, batch: int, capacity: int) -> DecodeState:
    """Empty state for `batch` rows of `capacity` cache slots (call under jit to place it
    sharded directly)."""
    zeros = constrain(jnp.zeros((batch,), jnp.int32), ("batch",))
    return DecodeState(init_kv(config, batch, capacity), zeros, zeros, zeros.astype(bool))


def _fold_in(keys: jax.Array, i) -> jax.Array:
    """keys [B] -> the keys of token ``i`` [B]."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, i)


def _prefill(model, tokens, lengths, count, kv, span, chunk: int, rows=None):
    """Writes row b's first count[b] ``tokens`` [B, N] into the cache at positions lengths[b]..,
    ``chunk`` tokens at a time (N a multiple of it, or N <= chunk), so activations stay
    [B, chunk, ...] however long the prompt; only the chunks the longest row needs run (a loop
    of max(count) / chunk passes), so one N serves every prompt longer than a chunk; ``rows``
    [B] (optional): the cache rows they are (see ``Decoder.extend``). Returns (hidden of each
    row's last token [B, D], kv)."""
    b, n = tokens.shape
    c = min(chunk, n)
    if n % c:
        raise ValueError(f"{n} tokens to prefill must be at most the chunk {chunk} or a multiple of it")

    def one(j, carry):  # pass j: tokens [j * c, (j + 1) * c)
        last, kv = carry
        off = j * c + jnp.arange(c, dtype=jnp.int32)
        tok = jax.lax.dynamic_slice_in_dim(tokens, j * c, c, axis=1)
        h, kv = model.extend(tok, lengths[:, None] + off, off < count[:, None], kv, span, rows)
        i = count - 1 - j * c  # the row's last token, if it falls in this chunk
        here = (i >= 0) & (i < c)
        pick = jax.vmap(lambda x, k: x[k])(h, jnp.clip(i, 0, c - 1))
        return jnp.where(here[:, None], pick, last), kv

    last = constrain(jnp.zeros((b, model.config.d_model), model.config.jnp_dtype), ("batch", None))
    passes = 1 if n == c else (jnp.max(count) + c - 1) // c
    return jax.lax.fori_loop(0, passes, one, (last, kv))


def generate(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, new_tokens: jax.Array,
             new_lens: jax.Array, active: jax.Array, reset: jax.Array, stop_ids: jax.Array,
             keys: jax.Array, *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
             span: int | None = None, prefill_chunk: int = 1024) -> tuple[DecodeState, Generation]:
    """One agent step for every active row.

    new_tokens [B,N] int32 (row b's first new_lens[b] entries are real); active [B] bool; reset
    [B] bool (forget the row's history first: a new conversation); stop_ids [B,S] int32 (-1 pads
    a row's stop set); keys [B]: one PRNG key per row (a row's samples depend on its key and
    its own tokens only). An active row needs at least one token to prefill (its
    pending token or a new one), and lengths + pending + new_lens + max_new_tokens <= capacity
    (not checked here: see `Sampler`). span (static): attend over the first `span` cache slots
    only; it must exceed every position this call writes (default: the whole capacity).
    prefill_chunk (static): new tokens prefilled per pass (N + 1 must be a multiple of it or
    at most it; powers of two are); a call runs as many passes as its longest row needs.
    Returns (new state, Generation).
    """
    model = nnx.merge(graphdef, params)
    # per-row inputs share the cache's batch sharding (required under Explicit mesh axes)
    new_tokens, stop_ids = (constrain(x, ("batch", None)) for x in (new_tokens, stop_ids))
    new_lens, active, reset, keys = (constrain(x, ("batch",)) for x in (new_lens, active, reset, keys))
    b, n = new_tokens.shape
    lengths = jnp.where(reset, 0, state.lengths)
    has_pending = state.has_pending & ~reset

    # Prefill: [pending?] + new tokens, at positions lengths[b] + i.
    tokens = jnp.where(has_pending[:, None],
                       jnp.concatenate([state.pending[:, None], new_tokens], axis=1),
                       jnp.concatenate([new_tokens, jnp.zeros_like(new_tokens[:, :1])], axis=1))
    count = jnp.where(active, new_lens + has_pending.astype(jnp.int32), 0)
    last, kv = _prefill(model, tokens, lengths, count, state.kv, span, prefill_chunk)
    lengths = lengths + count
    logits = model.logits(last)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids, axis=1)

    tok, logp = select_tokens(logits, _fold_in(keys, 0), sampling)
    out_tok = constrain(jnp.zeros((b, max_new_tokens), jnp.int32), ("batch", None))
    out_lp = constrain(jnp.zeros((b, max_new_tokens), jnp.float32), ("batch", None))
    out_tok = out_tok.at[:, 0].set(jnp.where(active, tok, 0))
    out_lp = out_lp.at[:, 0].set(jnp.where(active, logp, 0.0))
    stopped = active & is_stop(tok)
    done = ~active | stopped | (max_new_tokens == 1)
    counts = active.astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, kv, lengths, cur, done, stopped, counts, out_tok, out_lp = carry
        live = ~done
        h, kv = model.extend(cur[:, None], lengths[:, None], live[:, None], kv, span)
        lengths = lengths + live
        tok, logp = select_tokens(model.logits(h[:, 0]), _fold_in(keys, i), sampling)
        out_tok = out_tok.at[:, i].set(jnp.where(live, tok, 0))
        out_lp = out_lp.at[:, i].set(jnp.where(live, logp, 0.0))
        stop = live & is_stop(tok)
        done = done | stop | (i + 1 >= max_new_tokens)
        cur = jnp.where(live, tok, cur)
        return i + 1, kv, lengths, cur, done, stopped | stop, counts + live, out_tok, out_lp

    carry = (jnp.ones((), jnp.int32), kv, lengths, tok, done, stopped, counts, out_tok, out_lp)
    _, kv, lengths, cur, _, stopped, counts, out_tok, out_lp = jax.lax.while_loop(cond, body, carry)
    new_state = DecodeState(
        kv=kv,
        lengths=lengths,
        pending=jnp.where(active, cur, state.pending),
        has_pending=active | has_pending,
    )
    return new_state, Generation(out_tok, out_lp, counts, stopped)


jit_generate = jax.jit(generate, static_argnames=("graphdef", "max_new_tokens", "sampling", "span", "prefill_chunk"),
                       donate_argnames=("state",))
