"""Pure, jittable slot decoding: the sampler's rows are slots, each an independent conversation.

Two programs per chunk of a continuous batch (``Sampler.decode``):

- ``prefill_slots`` starts replies in P of the B slots: it prefills only those slots' new
  tokens (after the slot's pending token, if any), reading and writing their rows of the
  cache in place a layer at a time, and samples each one's first token, so its cost is P x
  the new tokens, not B x, and its memory one layer of P rows beyond the cache. The token becomes the slot's
  pending token, as in ``generate``.
- ``decode_slots`` then decodes up to ``chunk`` tokens in every busy slot: each iteration
  appends a slot's pending token to its cache and samples the next.

Token i of a reply is drawn with fold_in(key, i) for the slot's reply key, as ``generate``
draws it, so a reply cut into chunks is the one ``generate`` draws in one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from steppo_jax.sampling.generate import DecodeState, Generation, _prefill
from steppo_jax.sampling.select import SamplingParams, select_tokens
from steppo_jax.sharding import constrain, put_rows, take_rows


def _token_keys(keys: jax.Array, i: jax.Array) -> jax.Array:
    """keys [B], token indices i [B] -> the key of each row's token i[b] [B]."""
    return jax.vmap(jax.random.fold_in)(keys, i)


def _is_stop(tok: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop_ids, axis=1)


def _take_rows(state: DecodeState, rows: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lengths, pending, has_pending) [P] of the cache rows ``rows`` [P] (None: all rows)."""
    vectors = (state.lengths, state.pending, state.has_pending)
    return vectors if rows is None else tuple(take_rows(x, rows, ("batch",)) for x in vectors)


def _put_rows(state: DecodeState, rows: jax.Array | None, kv, lengths, pending, has_pending=None) -> DecodeState:
    """``state`` with the whole cache ``kv`` (updated in place) and the distinct cache rows
    ``rows`` [P] (None: all rows) of its vectors replaced (``has_pending`` None: unchanged)."""
    if rows is None:
        return DecodeState(kv, lengths, pending, state.has_pending if has_pending is None else has_pending)
    put = lambda full, x: full if x is None else put_rows(full, (rows,), x, (None,))  # noqa: E731
    return DecodeState(kv, put(state.lengths, lengths), put(state.pending, pending),
                       put(state.has_pending, has_pending))


def prefill_slots(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, rows: jax.Array | None,
                  starting: jax.Array, new_tokens: jax.Array, new_lens: jax.Array, reset: jax.Array,
                  stop_ids: jax.Array, keys: jax.Array, *, sampling: SamplingParams = SamplingParams(),
                  prefill_chunk: int = 1024) -> tuple[DecodeState, Generation]:
    """Starts a reply in the slots ``rows`` [P] (distinct slot ids; None: every slot, P = B)
    where ``starting`` [P].

    new_tokens [P, N] int32 (the first new_lens[p] are real); reset [P] bool (a new
    conversation: forget the slot's cache); stop_ids [P, S] (-1 pads); keys [P]: each reply's
    key. Rows not ``starting`` pad P to a bucket and change nothing. A starting slot needs a
    token to prefill (its pending one or a new one) and room in the cache (checked by the
    caller). prefill_chunk (static): as in ``generate``; attention reads the whole cache.

    Returns (new state, Generation of each of the P rows' first token: tokens and logprobs
    [P, 1], lengths [P] (1 if starting), stopped [P]).
    """
    model = nnx.merge(graphdef, params)
    new_tokens, stop_ids = (constrain(x, ("batch", None)) for x in (new_tokens, stop_ids))
    starting, new_lens, reset, keys = (constrain(x, ("batch",)) for x in (starting, new_lens, reset, keys))
    old_lengths, pending, old_has = _take_rows(state, rows)
    lengths = jnp.where(reset, 0, old_lengths)
    has_pending = old_has & ~reset
    tokens = jnp.where(has_pending[:, None], jnp.concatenate([pending[:, None], new_tokens], axis=1),
                       jnp.concatenate([new_tokens, jnp.zeros_like(pending[:, None])], axis=1))
    count = jnp.where(starting, new_lens + has_pending.astype(jnp.int32), 0)
    # the P rows are read and written in the whole cache, a layer at a time: no copy of their caches
    last, kv = _prefill(model, tokens, lengths, count, state.kv, None, prefill_chunk, rows=rows)
    tok, logp = select_tokens(model.logits(last), _token_keys(keys, jnp.zeros_like(new_lens)), sampling)
    new_state = _put_rows(state, rows, kv, jnp.where(starting, lengths + count, old_lengths),
                          jnp.where(starting, tok, pending), starting | old_has)
    first = Generation(jnp.where(starting, tok, 0)[:, None], jnp.where(starting, logp, 0.0)[:, None],
                       starting.astype(jnp.int32), starting & _is_stop(tok, stop_ids))
    return new_state, first


def decode_slots(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, busy: jax.Array,
                 stop_ids: jax.Array, keys: jax.Array, offsets: jax.Array, budget: jax.Array,
                 rows: jax.Array | None = None, floor: jax.Array | int = 0, *, chunk: int,
                 sampling: SamplingParams = SamplingParams(), span: int | None = None) -> tuple[DecodeState, Generation]:
    """Up to ``chunk`` (static) more tokens of the reply in each ``busy`` [B] slot.

    A busy slot has a pending token (its reply's last one) and ``offsets`` [B] tokens of its
    reply so far; it draws at most ``budget`` [B] tokens, token j of this call being the
    reply's token offsets[b] + j (key fold_in(keys[b], offsets[b] + j)), and stops early on
    one of its stop_ids [B, S]. Other slots change nothing.

    ``rows`` [B] (distinct cache rows, optional): the slots are these rows of a larger cache,
    read and written in place a layer at a time (``Decoder.extend``), so a cache can hold more
    conversations than a call decodes at the memory of one layer of B rows; None: slot b is
    cache row b.

    Returns (new state, Generation: tokens, logprobs [B, chunk]; lengths [B] drawn; stopped [B]).
    """
    model = nnx.merge(graphdef, params)
    busy, offsets, budget, keys = (constrain(x, ("batch",)) for x in (busy, offsets, budget, keys))
    stop_ids = constrain(stop_ids, ("batch", None))
    b = busy.shape[0]
    columns = jnp.arange(chunk, dtype=jnp.int32)[None, :]

    def cond(carry):
        i, *_, done, _, _, _, _ = carry
        return (i < chunk) & (jnp.sum(~done) > floor)

    def body(carry):
        i, kv, lengths, cur, done, stopped, counts, out_tok, out_lp = carry
        live = ~done
        h, kv = model.extend(cur[:, None], lengths[:, None], live[:, None], kv, span, rows)
        lengths = lengths + live
        tok, logp = select_tokens(model.logits(h[:, 0]), _token_keys(keys, offsets + counts), sampling)
        here = live[:, None] & (columns == counts[:, None])
        out_tok = jnp.where(here, tok[:, None], out_tok)
        out_lp = jnp.where(here, logp[:, None], out_lp)
        stop = live & _is_stop(tok, stop_ids)
        counts = counts + live
        done = done | stop | (counts >= budget)
        cur = jnp.where(live, tok, cur)
        return i + 1, kv, lengths, cur, done, stopped | stop, counts, out_tok, out_lp

    zeros = jnp.zeros_like(offsets)
    out_tok = constrain(jnp.zeros((b, chunk), jnp.int32), ("batch", None))
    out_lp = constrain(jnp.zeros((b, chunk), jnp.float32), ("batch", None))
    lengths, pending, _ = _take_rows(state, rows)
    carry = (jnp.zeros((), jnp.int32), state.kv, lengths, pending, ~busy | (budget <= 0),
             jnp.zeros_like(busy), zeros, out_tok, out_lp)
    _, kv, lengths, cur, _, stopped, counts, out_tok, out_lp = jax.lax.while_loop(cond, body, carry)
    return _put_rows(state, rows, kv, lengths, cur), Generation(out_tok, out_lp, counts, stopped)


jit_prefill_slots = jax.jit(prefill_slots, static_argnames=("graphdef", "sampling", "prefill_chunk"),
                            donate_argnames=("state",))
jit_decode_slots = jax.jit(decode_slots, static_argnames=("graphdef", "chunk", "sampling", "span"),
                           donate_argnames=("state",))
