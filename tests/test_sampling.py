"""Sampler: cached decode == recompute, multi-turn == re-prefill, log-probs == trainer, no recompiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from steppo_jax.models import Decoder, ModelConfig, token_logprobs
from steppo_jax.sampling import Sampler, SamplingParams, bucket, jit_generate, reply_keys, select_tokens
from steppo_jax.sampling.sampler import prefill_width
from steppo_jax.sampling.slots import decode_slots, jit_decode_slots, jit_prefill_slots

CFG = ModelConfig(model_type="qwen3", vocab_size=128, d_model=48, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=12, mlp_dim=96, qk_norm=True, tie_embeddings=False)


@pytest.fixture(scope="module")
def model():
    m = Decoder(CFG, rngs=nnx.Rngs(3))
    # sharpen the random model so greedy/argmax has clear winners
    m.lm_head.set_value(m.lm_head.get_value() * 40.0)
    return m


@nnx.jit
def _padded_logits(model, tokens):
    return model(tokens)


def _logits(model, seq):
    """Logits [len(seq), V] of one sequence, right-padded to 128 so one compile serves all."""
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :len(seq)] = seq
    return np.asarray(_padded_logits(model, jnp.asarray(tokens)))[0, :len(seq)]


def _trainer_logprobs(model, seq, temperature=1.0):
    tokens = jnp.asarray([seq], jnp.int32)
    logits = jnp.asarray(_logits(model, seq))[None]
    return np.asarray(token_logprobs(logits, tokens, temperature))[0]


def truncated_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Log-probs [V] (float64, -inf off the kept tokens) of the distribution sampled from, by
    its definition: logits / temperature; the top_k largest kept; then the most likely tokens
    until their mass reaches top_p (a token is kept if the mass strictly above it is < top_p;
    ties with the last one kept); renormalised over the kept tokens."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:
        p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        p /= p.sum()
        desc = np.sort(p)[::-1]
        above = np.cumsum(desc) - desc
        keep &= p >= desc[above < top_p].min()
    out = np.full(z.shape, -np.inf)
    kept = z[keep] - z[keep].max()
    out[keep] = kept - np.log(np.exp(kept).sum())
    return out


def _greedy_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(_logits(model, seq)[-1])))
    return seq[len(prompt):]


def test_cached_greedy_equals_recompute_and_trainer_logprobs(model):
    prompts = [[5, 9, 13, 2, 7], [3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    s = Sampler(model, batch_size=3, capacity=64, max_new_tokens=12,
                sampling=SamplingParams(greedy=True))
    out = s.step(prompts, [], jax.random.key(0), reset=True)
    for r, p in enumerate(prompts):
        assert out.tokens[r] == _greedy_recompute(model, p, 12)
        lp = _trainer_logprobs(model, p + out.tokens[r])[len(p):]
        np.testing.assert_allclose(out.logprobs[r], lp, atol=1e-5)
    assert not out.stopped.any()


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.7, top_k=5),
                                      SamplingParams(temperature=1.3, top_p=0.8),
                                      SamplingParams()])
def test_multiturn_continuation_matches_full_history(model, sampling):
    """Three turns with observations; each turn's log-probs are those of the truncated
    distribution of the trainer's forward over the whole packed history (the trainer's own
    log-probs without top-k/top-p), and the history equals what a fresh sampler re-prefilling
    it sees."""
    rng = np.random.default_rng(0)
    b = 3
    s = Sampler(model, batch_size=b, capacity=128, max_new_tokens=8, sampling=sampling)
    history = [list(rng.integers(0, 128, n)) for n in (4, 9, 6)]
    new = [list(h) for h in history]
    key = jax.random.key(1)
    for turn in range(3):
        key, sub = jax.random.split(key)
        out = s.step(new, [[1, 2], [3], [4, 5, 6]], sub, reset=turn == 0)
        for r in range(b):
            seq = history[r] + out.tokens[r]
            logits = _logits(model, seq)[len(history[r]) - 1:-1]
            lp = [truncated_logprobs(z, sampling.temperature, sampling.top_k, sampling.top_p)[t]
                  for z, t in zip(logits, out.tokens[r])]
            np.testing.assert_allclose(out.logprobs[r], lp, atol=1e-5)
            if sampling.top_k == 0 and sampling.top_p == 1.0:
                trainer = _trainer_logprobs(model, seq, sampling.temperature)[len(history[r]):]
                np.testing.assert_allclose(out.logprobs[r], trainer, atol=1e-5)
            if out.stopped[r]:
                assert out.tokens[r][-1] in ([1, 2], [3], [4, 5, 6])[r]
            history[r] = seq
        new = [list(rng.integers(0, 128, 1 + turn + r)) for r in range(b)]
        history = [h + o for h, o in zip(history, new)]
    # the cache now holds every token but the last sampled one (pending)
    lengths = np.asarray(s.state.lengths)
    assert list(lengths) == [len(h) - len(o) - 1 for h, o in zip(history, new)]


def test_multiturn_greedy_equals_reprefill(model):
    """Also covers attention spans: `s` (capacity 1024) attends over 128 then 256 cache slots,
    `fresh` over its whole 512."""
    s = Sampler(model, batch_size=2, capacity=1024, max_new_tokens=6,
                sampling=SamplingParams(greedy=True))
    fresh = Sampler(model, batch_size=2, capacity=512, max_new_tokens=6,
                    sampling=SamplingParams(greedy=True))
    history = [[7, 8, 9], [10, 11, 12, 13, 14]]
    new = [list(h) for h in history]
    for turn in range(3):
        out = s.step(new, [], jax.random.key(turn), reset=turn == 0)
        ref = fresh.step(history, [], jax.random.key(turn), reset=True)
        assert out.tokens == ref.tokens
        for a, b_ in zip(out.logprobs, ref.logprobs):
            np.testing.assert_allclose(a, b_, atol=1e-5)
        new = [[20 + turn, 21], [22 + turn] * (1 if turn else 120)]
        history = [h + o + n for h, o, n in zip(history, out.tokens, new)]


def test_stop_tokens_per_row_and_inactive_rows_untouched(model):
    s = Sampler(model, batch_size=3, capacity=64, max_new_tokens=10,
                sampling=SamplingParams(greedy=True))
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    free = s.step(prompts, [], jax.random.key(0), reset=True)
    stops = [[free.tokens[0][3]], [free.tokens[1][0]], [-5]]
    out = s.step(prompts, stops, jax.random.key(0), reset=True)
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stops[0][0]) + 1]
    assert out.tokens[1] == free.tokens[1][:1]
    assert out.tokens[2] == free.tokens[2]
    assert list(out.stopped) == [True, True, False]

    before = jax.tree.map(np.asarray, s.state)
    out2 = s.step([None, [9], None], [], jax.random.key(1))
    after = jax.tree.map(np.asarray, s.state)
    assert out2.tokens[0] == [] and out2.tokens[2] == [] and len(out2.tokens[1]) == 10
    for r in (0, 2):
        for c0, c1 in zip(before.kv, after.kv):  # k, v: [B, L, C, K, hd]
            np.testing.assert_array_equal(c0[r], c1[r])
        assert before.lengths[r] == after.lengths[r] and before.pending[r] == after.pending[r]


def test_no_recompile_across_turns_and_batches(model):
    s = Sampler(model, batch_size=2, capacity=128, max_new_tokens=4)
    key = jax.random.key(0)
    s.step([[1, 2, 3], [4, 5]], [9], key, reset=True)  # new-token bucket 8
    n = jit_generate._cache_size()
    for turn in range(3):
        s.step([[1] * (turn + 1), None if turn == 1 else [2, 3]], [9], jax.random.fold_in(key, turn))
    s.step([[5, 6, 7, 8], [9]], [9], key, reset=True)  # a new batch, same bucket
    assert jit_generate._cache_size() == n
    s.step([[5] * 9, [9]], [9], key, reset=True)  # next bucket (16) compiles once
    assert jit_generate._cache_size() == n + 1
    assert [bucket(i) for i in (1, 8, 9, 17)] == [8, 8, 16, 32]


def test_a_share_of_the_batch_samples_what_the_whole_batch_samples(model):
    """Per-row keys: rows [2, 4) drawn by a sampler holding only them (one process's share)
    are those the whole-batch sampler draws, over several turns."""
    hot = SamplingParams(temperature=40.0)  # undo the fixture's sharpening: real randomness
    whole = Sampler(model, batch_size=4, capacity=64, max_new_tokens=6, sampling=hot)
    share = Sampler(model, batch_size=2, capacity=64, max_new_tokens=6, sampling=hot, first_row=2)
    new = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    for turn in range(2):
        key = jax.random.key(turn)
        a = whole.step(new, [], key, reset=turn == 0)
        b = share.step(new[2:], [], key, reset=turn == 0)
        assert a.tokens[2:] == b.tokens
        new = [[11]] * 4
    assert a.tokens[0] != a.tokens[2] or a.tokens[1] != a.tokens[3]  # rows do draw differently


def test_capacity_and_context_errors(model):
    s = Sampler(model, batch_size=1, capacity=16, max_new_tokens=8)
    with pytest.raises(ValueError, match="capacity"):
        s.step([[1] * 9], [], jax.random.key(0), reset=True)
    with pytest.raises(ValueError, match="no context"):
        s.step([[]], [], jax.random.key(0), reset=True)


def test_select_tokens_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)
    tok, lp = select_tokens(logits, keys, SamplingParams(top_k=2))
    assert set(np.unique(tok)) == {0, 1}
    # the log-probs of the truncated distribution sampled from: 0.5 / 0.8 and 0.3 / 0.8
    np.testing.assert_allclose(lp, np.log(np.array([0.625, 0.375]))[np.asarray(tok)], atol=1e-6)
    tok, lp = select_tokens(logits, keys, SamplingParams(top_p=0.75))  # keeps {0, 1}
    assert set(np.unique(tok)) == {0, 1}
    np.testing.assert_allclose(lp, np.log(np.array([0.625, 0.375]))[np.asarray(tok)], atol=1e-6)
    tok, lp = select_tokens(logits, keys, SamplingParams(top_p=0.4))
    assert set(np.unique(tok)) == {0}
    np.testing.assert_allclose(lp, 0.0, atol=1e-6)  # one token left: probability 1
    tok, _ = select_tokens(logits, keys, SamplingParams())
    freq = np.bincount(np.asarray(tok), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.05)
    tok, lp = select_tokens(logits, keys, SamplingParams(greedy=True, temperature=2.0))
    assert (np.asarray(tok) == 0).all()
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits[0] / 2.0)[0], atol=1e-6)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 7, 0.6), (0.9, 0, 1.0)])
def test_select_tokens_logprobs_are_the_truncated_distributions(temperature, top_k, top_p):
    """Random logits of 4 rows: each sampled token's log-prob equals log softmax of the
    truncated, renormalised logits of the numpy reference, and only kept tokens are drawn."""
    logits = jax.random.normal(jax.random.key(0), (4, 40)) * 2.0
    ref = np.stack([truncated_logprobs(z, temperature, top_k, top_p) for z in np.asarray(logits)])
    for seed in range(3):
        keys = jax.random.split(jax.random.key(seed), 4)
        tok, lp = select_tokens(logits, keys, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        picked = ref[np.arange(4), np.asarray(tok)]
        assert np.all(np.isfinite(picked))
        np.testing.assert_allclose(lp, picked, atol=1e-5)


def test_bf16_sampler_close_to_trainer():
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    m = Decoder(cfg, rngs=nnx.Rngs(0))
    s = Sampler(m, batch_size=2, capacity=64, max_new_tokens=6, sampling=SamplingParams(greedy=True))
    out = s.step([[1, 2, 3], [4]], [], jax.random.key(0), reset=True)
    assert s.state.kv[0].dtype == jnp.bfloat16
    for r, p in enumerate([[1, 2, 3], [4]]):
        seq = jnp.asarray([p + out.tokens[r]])
        lp = np.asarray(token_logprobs(m(seq), seq))[0, len(p):]
        np.testing.assert_allclose(out.logprobs[r], lp, atol=0.05)


def test_release_frees_the_cache_and_a_new_conversation_matches_a_fresh_sampler(model):
    s = Sampler(model, batch_size=2, capacity=64, max_new_tokens=5, sampling=SamplingParams(greedy=True))
    assert s.state is None  # allocated by the first step
    s.step([[1, 2, 3], [4, 5]], [], jax.random.key(0), reset=True)
    params = s.params
    s.release()
    assert s.state is None and s.params is None
    with pytest.raises(ValueError, match="set_params"):
        s.step([[6], [7]], [], jax.random.key(1))
    s.set_params(params)
    again = s.step([[8, 9], [10]], [], jax.random.key(1))
    fresh = Sampler(model, batch_size=2, capacity=64, max_new_tokens=5, sampling=SamplingParams(greedy=True))
    assert again.tokens == fresh.step([[8, 9], [10]], [], jax.random.key(1), reset=True).tokens


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams(temperature=0.9)])
def test_chunked_prefill_equals_one_pass(model, sampling):
    """Prompts of 21 and 5 tokens (and a second turn) prefilled 8 tokens at a time."""
    prompts = [list(range(1, 22)), [3, 4, 5, 6, 7]]
    outs = []
    for chunk in (8, 1024):
        s = Sampler(model, batch_size=2, capacity=96, max_new_tokens=6, sampling=sampling, prefill_chunk=chunk)
        first = s.step(prompts, [], jax.random.key(0), reset=True)
        second = s.step([[30, 31] * 6, [40]], [], jax.random.key(1))
        outs.append((first, second))
    for a, b in zip(*outs):
        assert a.tokens == b.tokens
        for x, y in zip(a.logprobs, b.logprobs):
            np.testing.assert_allclose(x, y, atol=1e-5)
    # with chunk 8 both calls (22 and 13 tokens with the pending one) ran one width: the most a
    # call can prefill, 96 - 6 + 1 = 91 tokens, rounded up to 96; shorter ones a power of two
    assert {prefill_width(n, 8, 91) for n in range(9, 92)} == {96}
    assert [prefill_width(n, 8, 91) for n in (1, 5, 8)] == [8, 8, 8] and prefill_width(3, 1024, 91) == 8


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_in_chunks_draws_what_one_step_draws(model, chunk):
    """Two turns of sampled replies cut into chunks (rows resumed from their pending token,
    offsets advanced, keys of `reply_keys`) equal `step`'s replies for the same keys."""
    hot = SamplingParams(temperature=40.0)
    whole = Sampler(model, batch_size=3, capacity=96, max_new_tokens=7, sampling=hot, first_row=2)
    sliced = Sampler(model, batch_size=3, capacity=96, max_new_tokens=7, sampling=hot)
    new, stops = [[1, 2, 3], [4, 5], [6]], [[9], [10], [11]]
    key = jax.random.key(5)
    for turn in range(2):
        ref = whole.step(new, stops, jax.random.fold_in(key, turn), reset=turn == 0)
        keys = reply_keys(key, jnp.full(3, turn), jnp.arange(2, 5))
        toks, lps, offsets, ended = [[] for _ in range(3)], [[] for _ in range(3)], np.zeros(3, int), np.zeros(3, bool)
        calls = 0
        while not ended.all():
            rows = [None if ended[r] else (new[r] if offsets[r] == 0 else []) for r in range(3)]
            out = sliced.decode(rows, stops, keys, offsets, [turn == 0 and o == 0 for o in offsets], chunk)
            assert out.rows <= (~ended).sum()  # only busy rows decode
            for r in np.flatnonzero(~ended):
                toks[r] += out.tokens[r]
                lps[r] += list(out.logprobs[r])
                offsets[r] += len(out.tokens[r])
                assert len(out.tokens[r]) <= chunk
                ended[r] = out.stopped[r] or offsets[r] >= 7
            calls += 1
        assert toks == ref.tokens and calls >= -(-max(map(len, toks)) // chunk)
        for a, b in zip(lps, ref.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        new = [[20 + turn, 21], [22], [23, 24, 25]]
    with pytest.raises(ValueError, match="chunk=8"):
        sliced.decode([[1]] * 3, [], keys, [0] * 3, [True] * 3, 8)


def test_decode_runs_only_the_busy_rows(model):
    """With 3, then 1, of 16 slots busy, a call decodes 4, then 2 rows (busy slots rounded up to
    an eighth of decode_rows with 8 widths, read and written in place in the cache) and draws what `step` draws; its
    slot-steps are the prefill's rows (a power of two) plus the decode's rows x iterations."""
    hot = SamplingParams(temperature=40.0)
    whole = Sampler(model, batch_size=16, capacity=64, max_new_tokens=4, sampling=hot)
    slots = Sampler(model, batch_size=16, capacity=64, max_new_tokens=4, sampling=hot, decode_widths=8)
    key = jax.random.key(7)
    turns = [[[1, 2], [3], [4, 5, 6]] + [None] * 13, [None, [7, 8]] + [None] * 14]
    for turn, (new, rows, prefill) in enumerate(zip(turns, (4, 2), (4, 1))):
        ref = whole.step(new, [], jax.random.fold_in(key, turn), reset=turn == 0)
        keys = reply_keys(key, jnp.full(16, turn), jnp.arange(16))
        out = slots.decode(new, [], keys, [0] * 16, [turn == 0] * 16, 4)
        assert out.rows == rows and out.tokens == ref.tokens
        assert out.slot_steps == prefill + rows * 3  # no stop ids: every reply runs 1 + 3 tokens
        for a, b in zip(out.logprobs, ref.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_decode_call_ends_once_few_enough_rows_are_drawing(model):
    """`decode_slots` stops after the iteration that leaves at most ``floor`` rows drawing:
    budgets (1, 3, 3) draw (1, 1, 1) tokens with floor 2 and (1, 3, 3) with floor 0, and
    the first tokens agree."""
    s = Sampler(model, batch_size=3, capacity=64, max_new_tokens=8)
    keys = reply_keys(jax.random.key(0), jnp.zeros(3, jnp.int32), jnp.arange(3))
    s.decode([[1, 2], [3], [4]], [], keys, [0] * 3, [True] * 3, 1)  # each slot now holds a pending token
    outs = {}
    for floor, drawn in ((2, [1, 1, 1]), (0, [1, 3, 3])):
        _, outs[floor] = decode_slots(s.graphdef, s.params, s.state, jnp.ones(3, bool), jnp.full((3, 1), -1), keys,
                                      jnp.ones(3, jnp.int32), jnp.asarray([1, 3, 3]), floor=jnp.int32(floor), chunk=3)
        assert outs[floor].lengths.tolist() == drawn
    np.testing.assert_array_equal(outs[2].tokens[:, 0], outs[0].tokens[:, 0])


def test_warm_up_compiles_every_program_decode_runs(model):
    """After `warm_up`, calls with other busy counts, prompt widths and cache lengths compile
    nothing: 4 decode widths (one span) and 3 prefill row counts x 3 prefill widths."""
    s = Sampler(model, batch_size=4, capacity=32, max_new_tokens=4)
    assert s.warm_up(2) == 4 + 3 * 3
    programs = jit_decode_slots._cache_size(), jit_prefill_slots._cache_size()
    keys = reply_keys(jax.random.key(1), jnp.zeros(4, jnp.int32), jnp.arange(4))
    out = s.decode([[1] * 20, [2], None, [3, 4, 5]], [], keys, [0] * 4, [True] * 4, 2)
    offsets = [len(t) for t in out.tokens]
    s.decode([[], [], None, []], [], keys, offsets, [False] * 4, 2)
    s.decode([None, [6] * 9, [7], None], [], keys, [0] * 4, [False, False, True, False], 1)
    assert (jit_decode_slots._cache_size(), jit_prefill_slots._cache_size()) == programs


def test_decode_rows_fewer_than_cache_rows_draw_what_one_step_draws(model):
    """4 conversations held in the cache, decoded 2 at a time in chunks of 2, round robin (so
    replies are parked mid-way and resumed from their cache row): two turns equal `step`'s."""
    hot = SamplingParams(temperature=40.0)
    whole = Sampler(model, batch_size=4, capacity=96, max_new_tokens=6, sampling=hot)
    parked = Sampler(model, batch_size=4, capacity=96, max_new_tokens=6, sampling=hot, decode_rows=2)
    new, stops = [[1, 2, 3], [4, 5], [6], [7, 8]], [[9], [10], [11], [12]]
    key = jax.random.key(6)
    for turn in range(2):
        ref = whole.step(new, stops, jax.random.fold_in(key, turn), reset=turn == 0)
        keys = reply_keys(key, jnp.full(4, turn), jnp.arange(4))
        toks, lps, offsets, ended = [[] for _ in range(4)], [[] for _ in range(4)], np.zeros(4, int), np.zeros(4, bool)
        served = np.zeros(4, int)
        while not ended.all():
            pick = sorted(np.flatnonzero(~ended), key=lambda r: served[r])[:2]
            rows = [(new[r] if offsets[r] == 0 else []) if r in pick else None for r in range(4)]
            out = parked.decode(rows, stops, keys, offsets, [turn == 0 and o == 0 for o in offsets], 2)
            for r in pick:
                toks[r] += out.tokens[r]
                lps[r] += list(out.logprobs[r])
                offsets[r] += len(out.tokens[r])
                ended[r] = out.stopped[r] or offsets[r] >= 6
                served[r] += 1
        assert toks == ref.tokens and served.max() >= 2
        for a, b in zip(lps, ref.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        new = [[20 + turn, 21], [22], [23, 24, 25], [26]]
    with pytest.raises(ValueError, match="3 active rows, but a call decodes at most decode_rows=2"):
        parked.decode([[1], [1], [1], None], [], keys, [0] * 4, [True] * 4, 2)
    with pytest.raises(ValueError, match="decode_rows=5"):
        Sampler(model, batch_size=4, capacity=96, max_new_tokens=6, decode_rows=5)


def test_slot_calls_on_some_rows_copy_no_cache():
    """A prefill or decode of half the slots reads and writes their cache rows in place, a
    layer at a time: with 4 layers its temporaries stay near an eighth of the cache (one
    layer of half the rows), where gathering the rows' caches first took 0.7x the cache."""
    s = Sampler(Decoder(dataclasses.replace(CFG, n_layers=4), rngs=nnx.Rngs(0)), batch_size=8, capacity=2048,
                max_new_tokens=8)
    s._allocate()
    cache = sum(x.nbytes for x in jax.tree.leaves(s.state.kv))
    rows, four = jnp.arange(4), jnp.zeros(4, jnp.int32)
    keys = reply_keys(jax.random.key(0), four, rows)
    stops = jnp.full((4, 8), -1, jnp.int32)
    prefill = jit_prefill_slots.lower(s.graphdef, s.params, s.state, rows, four > 0, jnp.zeros((4, 7), jnp.int32),
                                      four, four > 0, stops, keys)
    decode = jit_decode_slots.lower(s.graphdef, s.params, s.state, four > 0, stops, keys, four, four, rows,
                                    jnp.int32(0), chunk=4, span=2048)
    for lowered in (prefill, decode):
        assert lowered.compile().memory_analysis().temp_size_in_bytes < cache / 3
