"""Bad replies inside an episode: error observations, penalties, truncation, limits."""

import pytest

from steppo_jax.envs import make

SEARCH = '<tool_call>{"name": "search", "arguments": {"query": "teacher of Kalo"}}</tool_call>'


@pytest.fixture
def env():
    env = make("multihop_qa", difficulty=1, max_steps=10, invalid_penalty=0.25,
               max_invalid_calls=3, max_reply_chars=300)
    env.reset(0, 0)
    return env


@pytest.mark.parametrize("reply, fragment", [
    ('<tool_call>{"name": "search", "arguments": {"query": </tool_call>', "invalid JSON"),
    ('<tool_call>{"name": "browse", "arguments": {}}</tool_call>',
     "unknown tool 'browse'; available tools: search, answer"),
    ('<tool_call>{"name": "search", "arguments": {"query": 42}}</tool_call>', "must be a string"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "missing argument(s): query"),
    ("", "empty reply"),
    ("I think the answer is Mira.", "no tool call"),
    ("x" * 301 + SEARCH, "reply too long (385 characters, the limit is 300)"),
])
def test_bad_reply_becomes_an_error_observation_with_penalty(env, reply, fragment):
    anchor = env.anchor()
    result = env.step(reply)
    assert [m["role"] for m in result.messages] == ["tool"]
    assert fragment in result.messages[0]["content"]
    assert result.info["invalid_call"] and fragment in result.info["error"]
    assert result.reward == -0.25
    assert not result.done and not result.truncated
    assert result.anchor == anchor


def test_consecutive_invalid_calls_end_the_episode_and_a_valid_call_resets_the_count(env):
    assert not env.step("").done
    assert not env.step("no call").done
    assert not env.step(SEARCH).info["invalid_call"]
    assert not env.step("").done
    assert not env.step("").done
    last = env.step("")
    assert last.done and not last.truncated  # a failure of the agent: terminal, nothing to bootstrap
    assert last.info["ended_reason"] == "invalid_calls"
    assert last.info["success"] is False and last.info["steps"] == 6
    assert not last.messages and "Error" in last.info["feedback"]


def test_max_invalid_calls_zero_never_truncates_for_invalid_calls():
    env = make("multihop_qa", max_steps=5, max_invalid_calls=0)
    env.reset(0, 0)
    results = [env.step("") for _ in range(5)]
    assert not any(r.truncated for r in results[:-1])
    assert results[-1].truncated and results[-1].info["truncated_reason"] == "max_steps"


def test_step_limit_truncates_valid_calls(env):
    env = make("multihop_qa", max_steps=2)
    env.reset(0, 0)
    assert not env.step(SEARCH).truncated
    last = env.step(SEARCH)
    assert last.truncated and not last.done and last.info["truncated_reason"] == "max_steps"
    assert last.reward == 0.0


def test_sokoban_rejects_a_direction_outside_the_enum():
    env = make("sokoban")
    env.reset(0, 0)
    result = env.step('<tool_call>{"name": "move", "arguments": {"direction": "north"}}'
                      "</tool_call>")
    assert result.info["invalid_call"] and "one of" in result.messages[0]["content"]


@pytest.mark.parametrize("option, value", [("max_steps", 0), ("max_invalid_calls", -1),
                                           ("max_reply_chars", 0)])
def test_bad_limits_are_rejected(option, value):
    with pytest.raises(ValueError, match=option):
        make("calculator", **{option: value})
