"""The rollout loop: token exactness, step tensors, failures, the real sampler's log-probs."""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from steppo_jax.envs import EnvPool, make
from steppo_jax.envs.base import Reset, StepResult
from steppo_jax.models import Decoder, ModelConfig, token_logprobs
from steppo_jax.rollout import (RolloutEngine, RolloutSettings, RolloutTimings, SlotEngine, packed_batch,
                                step_rows_batch)
from steppo_jax.sampling import Sampler, SamplingParams, StepOutput
from steppo_jax.tokenizer import load_tokenizer, render
from steppo_jax.types import validate


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class ScriptedSampler:
    """Stands in for the Sampler: replies come from a function of (row, step)."""

    def __init__(self, tok, batch_size, reply, max_new_tokens=64, close=True):
        self.tok, self.batch_size, self.reply, self.max_new_tokens, self.close = tok, batch_size, reply, max_new_tokens, close
        self.calls, self.step_no = [], 0

    def step(self, new_tokens, stop_ids, key, reset=False):
        self.calls.append([None if t is None else list(t) for t in new_tokens])
        tokens, logprobs = [], []
        for r, t in enumerate(new_tokens):
            ids = [] if t is None else self.tok.encode(self.reply(r, self.step_no), add_special_tokens=False)
            if t is not None and self.close:
                ids = ids + stop_ids[:1]
            tokens.append(ids)
            logprobs.append(-np.arange(1, len(ids) + 1, dtype=np.float32) / 10)
        self.step_no += 1
        return StepOutput(tokens, logprobs, np.array([self.close and t is not None for t in new_tokens]))


def engine_with(tok, sampler, env_name="multihop_qa", max_steps=6, max_context=1024, history_window=None,
                make_env=None, timeout_s=10.0):
    created = []

    def factory():
        env = make_env() if make_env else make(env_name)
        created.append(env)
        return env

    engine = RolloutEngine(factory, tok, sampler, RolloutSettings(max_steps, max_context, history_window),
                           EnvPool(num_workers=4, timeout_s=timeout_s))
    return engine, created


def test_packed_tokens_are_prompt_plus_sampled_plus_deltas(tok):
    sampler = ScriptedSampler(tok, 4, None)
    engine, created = engine_with(tok, sampler)
    sampler.reply = lambda row, step: created[row].expert_action()
    records = engine.collect([(0, 0), (1, 0)], 2, jax.random.key(0))
    for i, rec in enumerate(records):
        assert rec.failed is None and rec.terminated and rec.success
        # The stream is exactly what went into the sampler plus what came out of it.
        expected = []
        for k, call in enumerate(sampler.calls[:rec.num_steps]):
            expected += call[i]
            s, e = rec.step_spans[k]
            expected += rec.tokens[s:e]
        assert rec.tokens == expected
        # Decoding it reproduces the conversation as the chat template renders it.
        text = tok.decode(rec.tokens, skip_special_tokens=False)
        full = render(tok, rec.messages, tools=rec.tools, add_generation_prompt=False)
        assert full == text + "\n"
    batch = validate(packed_batch(records, 6))
    np.testing.assert_array_equal(batch.step_mask.sum(1), [r.num_steps for r in records])
    # Behaviour log-probs sit exactly on the action tokens.
    assert np.all((batch.old_logp != 0) == batch.action_mask)
    assert list(batch.group_ids) == [0, 0, 1, 1]


class CountingEnv:
    """Observation 'o' * (k + 1) after step k; ends after 2 steps with reward 1."""

    name, max_steps = "counting", 5

    def reset(self, task_id, seed):
        self.k = 0
        return Reset([{"role": "user", "content": "go"}], [], "s0")

    def step(self, action_text):
        self.k += 1
        done = self.k == 2
        msgs = [] if done else [{"role": "tool", "content": "o"}]
        return StepResult(msgs, 1.0 if done else 0.0, done, False, f"s{self.k}", {"success": done})

    def expert_action(self):
        return "x"


def test_step_tensors_match_a_hand_built_example(tok):
    sampler = ScriptedSampler(tok, 1, lambda r, k: "ab")
    engine, _ = engine_with(tok, sampler, make_env=CountingEnv)
    rec = engine.collect([(0, 0)], 1, jax.random.key(0))[0]
    prompt = tok.encode(render(tok, [{"role": "user", "content": "go"}], add_generation_prompt=True),
                        add_special_tokens=False)
    reply = tok.encode("ab", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    delta = tok.encode("\n<|im_start|>user\n<tool_response>\no\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)
    assert rec.tokens == prompt + reply + delta + reply
    p, a, d = len(prompt), len(reply), len(delta)
    batch = validate(packed_batch([rec], 3, seq_len=64))
    ids = np.full(64, -1)
    ids[p:p + a] = 0
    ids[p + a + d:p + 2 * a + d] = 1
    np.testing.assert_array_equal(batch.step_ids[0], ids)
    np.testing.assert_array_equal(batch.value_pos[0], [p - 1, p + a + d - 1, 0])
    np.testing.assert_array_equal(batch.step_mask[0], [True, True, False])
    np.testing.assert_array_equal(batch.step_rewards[0], [0.0, 1.0, 0.0])
    assert bool(batch.terminated[0]) and int(batch.seq_lens[0]) == p + 2 * a + d
    rows = validate(step_rows_batch([rec], 3, pack=False))
    np.testing.assert_array_equal(rows.seq_lens[:2], [p + a, p + 2 * a + d])
    # Packed: both step rows share one row of T = 64, step 0's row first (slot order).
    first, second = p + a, p + 2 * a + d
    rows = validate(step_rows_batch([rec], 3))
    assert rows.tokens.shape == (1, 64) and int(rows.seq_lens[0]) == first + second
    np.testing.assert_array_equal(rows.tokens[0, :first + second], rec.tokens[:first] + rec.tokens)
    np.testing.assert_array_equal(rows.segment_ids[0], [1] * first + [2] * second + [0] * (64 - first - second))
    ids = np.full(64, -1)
    ids[p:first] = 0
    ids[first + p + a + d:first + second] = 1
    np.testing.assert_array_equal(rows.step_ids[0], ids)
    np.testing.assert_array_equal(rows.value_pos[0], [p - 1, first + p + a + d - 1])
    np.testing.assert_array_equal(rows.traj_index[0], [0, 0])
    np.testing.assert_array_equal(rows.step_index[0], [0, 1])


def test_unclosed_reply_gets_its_end_of_turn_before_the_observation(tok):
    sampler = ScriptedSampler(tok, 1, lambda r, k: "ab", close=False)
    engine, _ = engine_with(tok, sampler, make_env=CountingEnv)
    rec = engine.collect([(0, 0)], 1, jax.random.key(0))[0]
    s, e = rec.step_spans[0]
    assert rec.tokens[e] == tok.convert_tokens_to_ids("<|im_end|>")  # a context token, not an action
    assert rec.tokens[s:e] == tok.encode("ab", add_special_tokens=False)


class BrokenEnv(CountingEnv):
    def __init__(self, mode):
        self.mode = mode

    def step(self, action_text):
        if self.mode == "raise":
            raise RuntimeError("environment exploded")
        if self.mode == "hang":
            time.sleep(3)
        return super().step(action_text)


def test_failing_and_hanging_environments_fail_only_their_trajectory(tok):
    modes = iter(["ok", "raise", "hang", "ok"])
    sampler = ScriptedSampler(tok, 4, lambda r, k: "ab")
    engine, _ = engine_with(tok, sampler, make_env=lambda: BrokenEnv(next(modes)), timeout_s=0.5)
    records = engine.collect([(0, 0), (1, 0)], 2, jax.random.key(0))
    assert [r.failed is None for r in records] == [True, False, False, True]
    assert "exploded" in records[1].failed and "TimeoutError" in records[2].failed
    batch = validate(packed_batch(records, 3))
    assert not batch.step_mask[1].any() and not batch.step_mask[2].any()  # excluded from the update
    assert records[0].success and records[3].success


def test_context_limit_truncates(tok):
    sampler = ScriptedSampler(tok, 1, lambda r, k: "ab " * 10)
    engine, _ = engine_with(tok, sampler, make_env=CountingEnv, max_context=80)
    rec = engine.collect([(0, 0)], 1, jax.random.key(0))[0]
    assert rec.truncated and not rec.terminated and len(rec.tokens) <= 80


@pytest.mark.parametrize("window", [None, 1])
def test_bootstrap_reads_the_state_where_the_next_steps_value_is_trained(tok, window):
    """Cut after step 0 (max_steps=1), the trajectory keeps its final observation; its bootstrap
    position is where the uncut run (which takes step 1 from that state) reads V for step 1:
    the same tokens up to the same position, in packed rows and in step rows."""
    runs = []
    for steps in (1, 2):
        sampler = ScriptedSampler(tok, 1, lambda r, k: "ab")
        engine, _ = engine_with(tok, sampler, make_env=CountingEnv, max_steps=steps, history_window=window)
        runs.append(engine.collect([(0, 0)], 1, jax.random.key(0))[0])
    cut, full = runs
    assert cut.truncated and cut.has_final_state and cut.num_steps == 1 and full.terminated
    layouts = [lambda recs: step_rows_batch(recs, 2, pack=False)]
    if window is None:
        layouts.append(lambda recs: packed_batch(recs, 2))
    for layout in layouts:
        a, b = validate(layout([cut])), validate(layout([full]))
        assert not a.terminated[0]
        (row,), (pos,) = (np.asarray(x) for x in a.bootstrap_index())
        trained = [(r, k) for r in range(b.batch_size) for k in range(b.num_slots)
                   if b.slot_mask()[r, k] and (b.packed and k == 1 or not b.packed and b.step_index[r, k] == 1)]
        (r1, k1), = trained
        assert pos == b.value_pos[r1, k1]
        np.testing.assert_array_equal(a.tokens[row, :pos + 1], b.tokens[r1, :pos + 1])


class LongObservationEnv(CountingEnv):
    """Never ends; its observation is longer than any context left."""

    def step(self, action_text):
        return StepResult([{"role": "tool", "content": "o " * 100}], 0.0, False, False, "s", {})


def test_an_observation_past_the_context_leaves_nothing_to_bootstrap(tok):
    sampler = ScriptedSampler(tok, 1, lambda r, k: "ab")
    engine, _ = engine_with(tok, sampler, make_env=LongObservationEnv, max_context=80)
    rec = engine.collect([(0, 0)], 1, jax.random.key(0))[0]
    assert rec.truncated and rec.overflowed and not rec.has_final_state and rec.num_steps == 1
    assert rec.tokens[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the reply ends the stream
    assert validate(packed_batch([rec], 2)).terminated[0]  # bootstrap 0, not V after the reply
    rows = validate(step_rows_batch([rec], 2))
    assert rows.terminated[0] and rows.bootstrap_row[0] == -1


def test_history_window_rebuilds_prompts_as_step_rows(tok):
    sampler = ScriptedSampler(tok, 2, lambda r, k: "ab")
    engine, _ = engine_with(tok, sampler, make_env=CountingEnv, history_window=0)
    records = engine.collect([(0, 0)], 2, jax.random.key(0))
    rows = validate(step_rows_batch(records, 3, pack=False))
    # With a window of 0 exchanges every step sees only the opening messages.
    assert records[0].contexts[0] == records[0].contexts[1]
    with pytest.raises(ValueError, match="step_rows_batch"):
        packed_batch(records, 3)
    assert rows.traj_index[:4, 0].tolist() == [0, 0, 1, 1]
    packed = validate(step_rows_batch(records, 3))
    assert packed.batch_size == 1 and packed.traj_index.tolist() == [[0, 0, 1, 1]]
    assert packed.step_index.tolist() == [[0, 1, 0, 1]]


class ChattyEnv:
    """Answers step k with two messages (a tool result and a user nudge); ends after 4 steps."""

    name, max_steps = "chatty", 6

    def reset(self, task_id, seed):
        self.k = 0
        return Reset([{"role": "system", "content": "be brief"}, {"role": "user", "content": "go"}], [], "s0")

    def step(self, action_text):
        self.k += 1
        done = self.k == 4
        msgs = [] if done else [{"role": "tool", "content": f"o{self.k}"}, {"role": "user", "content": f"n{self.k}"}]
        return StepResult(msgs, 1.0 if done else 0.0, done, False, f"s{self.k}", {"success": done})


@pytest.mark.parametrize("window", [1, 2])
def test_history_window_step_rows_hold_the_opening_and_the_last_exchanges(tok, window):
    sampler = ScriptedSampler(tok, 1, lambda r, k: f"r{k}")
    engine, _ = engine_with(tok, sampler, make_env=ChattyEnv, history_window=window)
    (rec,) = engine.collect([(0, 0)], 1, jax.random.key(0))
    assert rec.terminated and rec.num_steps == 4
    rows = validate(step_rows_batch([rec], 4, pack=False))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "go"}]
    for k in range(4):
        history = []
        for j in range(max(0, k - window), k):  # exchange j: reply j and the answer to it
            history += [{"role": "assistant", "content": f"r{j}"}, {"role": "tool", "content": f"o{j + 1}"},
                        {"role": "user", "content": f"n{j + 1}"}]
        prompt = tok.encode(render(tok, opening + history, add_generation_prompt=True), add_special_tokens=False)
        reply = tok.encode(f"r{k}", add_special_tokens=False) + [end]
        expected = prompt + reply
        assert rows.tokens[k, :len(expected)].tolist() == expected, k
        assert not rows.tokens[k, len(expected):].any()
        assert np.flatnonzero(rows.step_ids[k] == 0).tolist() == list(range(len(prompt), len(expected)))


def test_history_window_is_wired_from_the_config():
    from steppo_jax.train.config import ConfigError, load_config
    from steppo_jax.train.runtime import Runtime

    cfg = load_config(None, ["rollout.layout=step_rows", "rollout.history_window=2"])
    assert Runtime.settings(types.SimpleNamespace(cfg=cfg)).history_window == 2
    with pytest.raises(ConfigError, match="rollout.history_window.*step_rows"):
        load_config(None, ["rollout.history_window=2"])
    with pytest.raises(ConfigError, match="rollout.history_window.*>= 0"):
        load_config(None, ["rollout.layout=step_rows", "rollout.history_window=-1"])


def test_real_sampler_logprobs_match_the_trainer_forward(tok):
    """Rollout with a tiny random model: behaviour log-probs == recomputed log-probs."""
    model = Decoder(ModelConfig.tiny(vocab_size=len(tok), n_layers=2, d_model=64, mlp_dim=128), rngs=nnx.Rngs(0))
    sampler = Sampler(model, batch_size=4, capacity=512, max_new_tokens=12, sampling=SamplingParams(temperature=1.0))
    engine, _ = engine_with(tok, sampler, max_steps=3, max_context=512)
    records = engine.collect([(0, 0), (1, 0)], 2, jax.random.key(1))
    assert sum(r.num_steps for r in records) >= 4
    batch = validate(packed_batch(records, 3))
    logp = token_logprobs(model(jnp.asarray(batch.tokens)), jnp.asarray(batch.tokens))
    np.testing.assert_allclose(np.where(batch.action_mask, logp, 0), batch.old_logp, atol=1e-4)
    validate(step_rows_batch(records, 3))


@pytest.mark.parametrize("mistake, noise", [(0.0, 0.0), (1.0, 0.0), (0.5, 0.0), (0.0, 1.0)])
def test_noisy_expert_mixes_mistakes_and_random_calls(mistake, noise):
    """Two-hop tasks: the expert always succeeds; its characteristic mistake (answering after
    the first hop) always fails; random calls almost never succeed."""
    from steppo_jax.rollout.scripted import NoisyExpert

    envs = [make("multihop_qa", difficulty=2) for _ in range(40)]
    policy = NoisyExpert(envs, noise=noise, seed=0, mistake=mistake)
    outcomes, early = [], 0
    for row, env in enumerate(envs):
        env.reset(row, 0)
        for step in range(env.max_steps):
            reply = policy(row, step, "")
            early += step == 1 and '"answer"' in reply and noise == 0
            result = env.step(reply)
            if result.done:
                break
        outcomes.append(result.reward == 1.0)
    if noise == 1.0:
        assert np.mean(outcomes) < 0.2
    elif mistake == 0.0:
        assert all(outcomes)
    elif mistake == 1.0:
        assert not any(outcomes) and early == len(envs)
    else:
        assert 0.25 < np.mean(outcomes) < 0.75 and early == len(envs) - sum(outcomes)


@pytest.fixture(scope="module")
def sharp_model(tok):
    """A tiny random model whose argmax has clear winners (greedy comparisons are exact)."""
    m = Decoder(ModelConfig.tiny(vocab_size=len(tok), n_layers=2, d_model=64, mlp_dim=128, tie_embeddings=False),
                rngs=nnx.Rngs(0))
    m.lm_head.set_value(m.lm_head.get_value() * 20.0)
    return m


def slot_engine_with(tok, model, slots, chunk=5, sampling=SamplingParams(greedy=True), max_steps=3,
                     history_window=None, make_env=None, timeout_s=10.0, decode_rows=None):
    sampler = Sampler(model, batch_size=slots, capacity=512, max_new_tokens=12, sampling=sampling,
                      decode_rows=decode_rows)
    factory = make_env or (lambda: make("multihop_qa"))
    return SlotEngine(factory, tok, sampler, RolloutSettings(max_steps, 512, history_window),
                      EnvPool(num_workers=4, timeout_s=timeout_s), chunk=chunk)


@pytest.mark.parametrize("window,slots,decode_rows", [(None, 3, None), (1, 3, None), (None, 4, 2)])
def test_greedy_slots_equal_the_synchronous_engine(tok, sharp_model, window, slots, decode_rows):
    """4 trajectories on 3 slots (so caches get evicted and re-prefilled), or on 4 slots
    decoded 2 at a time (a trajectory waiting on its environment parks its cache while
    others decode), replies cut into chunks of 5: the
    same tokens, log-probs and step tensors as the step-synchronous engine."""
    tasks, key = [(0, 0), (1, 0)], jax.random.key(3)
    sync = Sampler(sharp_model, batch_size=4, capacity=512, max_new_tokens=12, sampling=SamplingParams(greedy=True))
    ref, _ = engine_with(tok, sync, max_steps=3, max_context=512, history_window=window)
    expected = ref.collect(tasks, 2, key)
    timings = RolloutTimings()
    got = slot_engine_with(tok, sharp_model, slots, history_window=window,
                           decode_rows=decode_rows).collect(tasks, 2, key, timings)
    assert sum(r.num_steps for r in got) >= 8
    for a, b in zip(got, expected):
        assert a.tokens == b.tokens and a.step_spans == b.step_spans and a.contexts == b.contexts
        assert a.rewards == b.rewards and a.truncated == b.truncated and a.failed is None
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    layout = packed_batch if window is None else step_rows_batch
    validate(layout(got, 3))
    assert timings.decoded_tokens == sum(e - s for r in got for s, e in r.step_spans)
    assert 0 < timings.slot_utilisation <= 1


def test_sampled_slots_draw_what_the_synchronous_engine_draws(tok, sharp_model):
    """Sampling (temperature 30: real randomness): the slots draw, for a key, the trajectories
    the synchronous engine draws (reply keys follow (step, trajectory), not the slot); each
    packed row is its rendered conversation and the behaviour log-probs are the trainer's."""
    hot = SamplingParams(temperature=30.0)
    key = jax.random.key(7)
    records = slot_engine_with(tok, sharp_model, 2, chunk=4, sampling=hot).collect([(0, 0), (1, 0)], 2, key)
    sync = Sampler(sharp_model, batch_size=4, capacity=512, max_new_tokens=12, sampling=hot)
    for a, b in zip(records, engine_with(tok, sync, max_steps=3, max_context=512)[0].collect([(0, 0), (1, 0)], 2, key)):
        assert a.tokens == b.tokens and a.rewards == b.rewards
    for rec in records:
        text = tok.decode(rec.tokens, skip_special_tokens=False)
        assert render(tok, rec.messages, tools=rec.tools, add_generation_prompt=False).startswith(text)
    batch = validate(packed_batch(records, 3))
    logp = token_logprobs(sharp_model(jnp.asarray(batch.tokens)), jnp.asarray(batch.tokens), 30.0)
    np.testing.assert_allclose(np.where(batch.action_mask, logp, 0), batch.old_logp, atol=1e-3)
    assert len({tuple(r.tokens) for r in records}) == 4  # rows do draw differently


def test_an_environment_that_fails_in_a_slot_fails_only_its_trajectory(tok, sharp_model):
    modes = iter(["ok", "raise", "hang", "ok"])
    engine = slot_engine_with(tok, sharp_model, 2, make_env=lambda: BrokenEnv(next(modes)), timeout_s=0.5)
    records = engine.collect([(0, 0), (1, 0)], 2, jax.random.key(0))
    assert [r.failed is None for r in records] == [True, False, False, True]
    assert "exploded" in records[1].failed and "TimeoutError" in records[2].failed
    assert records[0].success and records[3].success and records[0].num_steps == 2
    with pytest.raises(ValueError, match="decode chunk 13"):
        slot_engine_with(tok, sharp_model, 2, chunk=13)
