"""Built-in generated environments: expert vs random, determinism, protocol, rewards."""

import random

import pytest

from tests.env_policies import random_action, run_episode, success_rate
from steppo_jax.envs import Environment, make, parse_tool_call

GENERATED = [
    ("multihop_qa", {"difficulty": 1}), ("multihop_qa", {"difficulty": 2}),
    ("multihop_qa", {"difficulty": 3}), ("multihop_qa", {"difficulty": 4}),
    ("calculator", {"difficulty": 1}), ("calculator", {"difficulty": 2}),
    ("calculator", {"difficulty": 3}),
    ("sokoban", {"difficulty": 1}), ("sokoban", {"difficulty": 2}),
    ("sokoban", {"difficulty": 3}),
]
IDS = [f"{name}-d{opts['difficulty']}" for name, opts in GENERATED]


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_expert_solves_at_least_99_percent_of_200_tasks(name, options):
    assert success_rate(make(name, **options), policy="expert") >= 0.99


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_random_policy_rarely_succeeds(name, options):
    assert success_rate(make(name, **options), policy="random") <= 0.15


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_same_task_and_seed_give_the_same_episode(name, options):
    first, second = make(name, **options), make(name, **options)
    for task_id in range(5):
        reset_a, steps_a = run_episode(first, task_id, seed=3)
        run_episode(first, task_id + 100, seed=3)  # state from another task must not leak
        reset_b, steps_b = run_episode(second, task_id, seed=3)
        assert reset_a == reset_b
        assert steps_a == steps_b


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_different_tasks_or_seeds_give_different_tasks(name, options):
    env = make(name, **options)
    openings = {str(env.reset(t, s).messages) for t in range(20) for s in range(2)}
    assert len(openings) >= 36


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_protocol_and_expert_reply_format(name, options):
    env = make(name, **options)
    assert isinstance(env, Environment)
    reset, steps = run_episode(env, task_id=7, seed=0)
    assert reset.tools and all(t["type"] == "function" for t in reset.tools)
    assert [m["role"] for m in reset.messages] == ["system", "user"]
    assert isinstance(reset.anchor, str) and reset.anchor
    for i, (action, result) in enumerate(steps):
        reasoning, _, _ = action.partition("<tool_call>")
        assert reasoning.strip().endswith(".") and "\n" not in reasoning.strip()
        assert parse_tool_call(action, reset.tools).kind == "call"
        assert isinstance(result.anchor, str)
        last = i == len(steps) - 1
        assert (result.done or result.truncated) == last
        assert ("success" in result.info) == last
        if not last:
            assert [m["role"] for m in result.messages] == ["tool"]
    assert steps[-1][1].done and steps[-1][1].messages == []
    with pytest.raises(RuntimeError, match="reset"):
        env.step(steps[-1][0])


@pytest.mark.parametrize("name, options", GENERATED, ids=IDS)
def test_anchor_tracks_the_state(name, options):
    env = make(name, **options)
    reset = env.reset(4, 0)
    again = make(name, **options).reset(4, 0)
    assert reset.anchor == again.anchor
    result = env.step(env.expert_action())
    assert result.anchor != reset.anchor


def test_multihop_wrong_answer_scores_zero_and_reports_f1():
    env = make("multihop_qa", difficulty=1)
    env.reset(0, 0)
    gold = env.world.answer
    result = env.step('<tool_call>{"name": "answer", "arguments": {"answer": "%s Zed"}}'
                      "</tool_call>" % gold)
    assert result.done and result.reward == 0.0 and not result.info["success"]
    assert result.info["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    env.reset(0, 0)
    result = env.step('<tool_call>{"name": "answer", "arguments": {"answer": "the %s!"}}'
                      "</tool_call>" % gold.lower())
    assert result.reward == 1.0 and result.info["success"] and result.info["em"] == 1.0


def test_multihop_easiest_level_is_short():
    env = make("multihop_qa", difficulty=1)
    hops = [env.reset(t, 0).info["hops"] for t in range(50)]
    assert set(hops) == {1, 2}
    _, steps = run_episode(env, 1, 0)
    observations = [r.messages[0]["content"] for _, r in steps if r.messages]
    assert all(len(o) < 40 and o.count(".") == 1 for o in observations)
    hard = make("multihop_qa", difficulty=4)
    assert max(hard.reset(t, 0).info["hops"] for t in range(50)) == 4


def test_multihop_hop_range_option():
    """1-3 hops on level 1's small name pool: every count occurs, the expert solves every task
    in hops + 1 steps, and max_steps follows the range."""
    env = make("multihop_qa", difficulty=1, min_hops=1, max_hops=3)
    hops = [env.reset(t, 0).info["hops"] for t in range(60)]
    assert set(hops) == {1, 2, 3} and env.max_steps == 6
    for t in range(20):
        _, steps = run_episode(env, t, 0)
        assert steps[-1][1].info["success"] and len(steps) == hops[t] + 1


def test_multihop_search_finds_the_fact_and_unknown_words_find_nothing():
    env = make("multihop_qa", difficulty=1)
    env.reset(2, 0)
    subject, relation, obj = env.world.chain[0]
    result = env.step('<tool_call>{"name": "search", "arguments": {"query": "%s of %s"}}'
                      "</tool_call>" % (relation, subject))
    assert result.messages[0]["content"] == f"The {relation} of {subject} is {obj}."
    result = env.step('<tool_call>{"name": "search", "arguments": {"query": "qwxz"}}'
                      "</tool_call>")
    assert result.messages[0]["content"] == "No passages found."


def test_multihop_mistake_is_answering_after_the_first_hop():
    env = make("multihop_qa", difficulty=2)
    env.reset(0, 0)
    o0 = env.world.chain[0][2]
    assert env.mistake_action() is None  # nothing found yet: no early answer to give
    env.step(env.expert_action())
    early = parse_tool_call(env.mistake_action()).call
    assert (early.name, early.arguments) == ("answer", {"answer": o0})
    result = env.step(env.mistake_action())
    assert result.done and result.reward == 0.0
    env.reset(0, 0)
    env.step(env.expert_action())
    env.step(env.expert_action())
    assert env.mistake_action() is None  # all hops found: the answer is due, no mistake
    assert env.step(env.expert_action()).reward == 1.0


def test_final_answer_without_tool_call_where_allowed():
    env = make("multihop_qa", difficulty=1, allow_final_answer=True)
    env.reset(5, 0)
    result = env.step(f"I know it.\n{env.world.answer}")
    assert result.done and result.info["success"]
    strict = make("multihop_qa", difficulty=1)
    strict.reset(5, 0)
    result = strict.step(f"I know it.\n{strict.world.answer}")
    assert not result.done and result.info["invalid_call"]


def test_calculator_rewards_the_right_number_only():
    env = make("calculator", difficulty=2)
    env.reset(3, 0)
    gold = env.gold
    wrong = env.step('<tool_call>{"name": "answer", "arguments": {"answer": %d}}</tool_call>'
                     % (gold + 1))
    assert wrong.done and wrong.reward == 0.0 and not wrong.info["success"]
    env.reset(3, 0)
    right = env.step('<tool_call>{"name": "answer", "arguments": {"answer": %d.0}}</tool_call>'
                     % gold)
    assert right.reward == 1.0 and right.info["success"]


def test_calculator_final_answer_is_the_last_number_where_allowed():
    env = make("calculator", allow_final_answer=True)
    env.reset(8, 0)
    result = env.step(f"I computed 3 steps. The answer is {env.gold}.")
    assert result.done and result.info["success"]
    env.reset(8, 0)
    result = env.step("I do not know.")
    assert result.done and not result.info["success"] and result.reward == 0.0


@pytest.mark.parametrize("name, options", [("multihop_qa", {"difficulty": 3}),
                                           ("calculator", {"difficulty": 3}),
                                           ("sokoban", {"difficulty": 1})])
def test_expert_recovers_after_noisy_steps(name, options):
    """SFT noise replaces some expert steps; the expert must continue from any state."""
    rng = random.Random(0)
    env = make(name, max_steps=40, max_invalid_calls=0, **options)
    wins = 0
    for task_id in range(50):
        reset = env.reset(task_id, 0)
        history = list(reset.messages)
        tools = [t for t in reset.tools if t["function"]["name"] != "answer"]
        for step in range(40):
            noisy = step < 6 and rng.random() < 0.5
            action = random_action(rng, tools, history) if noisy else env.expert_action()
            result = env.step(rng.choice(["", action]) if noisy else action)
            history += result.messages
            if result.done or result.truncated:
                break
        wins += result.info["success"]
    # Random sokoban moves can push a box into a corner; the others always stay solvable.
    assert wins >= (40 if name == "sokoban" else 50)


def test_calculator_tool_reports_bad_expressions_to_the_agent():
    env = make("calculator")
    env.reset(0, 0)
    result = env.step('<tool_call>{"name": "calculate", "arguments": '
                      '{"expression": "__import__(\'os\').getcwd()"}}</tool_call>')
    content = result.messages[0]["content"]
    assert content.startswith("Error:") and "not allowed" in content
    assert not result.done and not result.info["invalid_call"]
    result = env.step('<tool_call>{"name": "calculate", "arguments": '
                      '{"expression": "(7 + 5) * 3 / 4"}}</tool_call>')
    assert result.messages[0]["content"] == "9"


def _sokoban_at(layout):
    """A sokoban env whose state is replaced by ``layout`` (rows of symbols)."""
    from steppo_jax.envs.sokoban import Room
    env = make("sokoban")
    env.reset(0, 0)
    cells = {(r, c): ch for r, row in enumerate(layout) for c, ch in enumerate(row)}
    env.room = Room(len(layout), frozenset(p for p, ch in cells.items() if ch != "#"),
                    frozenset(p for p, ch in cells.items() if ch in ".*+"))
    env.player = next(p for p, ch in cells.items() if ch in "@+")
    env.boxes = frozenset(p for p, ch in cells.items() if ch in "$*")
    return env


def test_sokoban_invalid_move_penalty_and_solved_reward():
    env = _sokoban_at(["#####", "#@$.#", "#___#", "#####", "#####"])
    move = '<tool_call>{"name": "move", "arguments": {"direction": "%s"}}</tool_call>'
    blocked = env.step(move % "up")
    assert blocked.reward == pytest.approx(-0.1) and blocked.info["invalid_move"]
    assert blocked.messages[0]["content"].startswith("You cannot move up.")
    assert not blocked.info["invalid_call"]
    down = env.step(move % "down")
    assert down.reward == 0.0 and down.messages[0]["content"].splitlines()[2] == "#@__#"
    env = _sokoban_at(["#####", "#@$.#", "#___#", "#####", "#####"])
    assert env.expert_action().startswith("I push the box right.")
    solved = env.step(move % "right")
    assert solved.done and solved.reward == 1.0 and solved.info["success"]


def test_sokoban_expert_replans_after_a_detour():
    env = make("sokoban", difficulty=2)
    env.reset(11, 0)
    optimal = env.reset(11, 0).info["optimal_moves"]
    move = '<tool_call>{"name": "move", "arguments": {"direction": "%s"}}</tool_call>'
    for direction in ("left", "up"):
        env.step(move % direction)
    result = None
    for _ in range(env.max_steps - 2):
        result = env.step(env.expert_action())
        if result.done or result.truncated:
            break
    assert result.done and result.info["success"] and result.info["steps"] <= optimal + 6


@pytest.mark.parametrize("name, bad", [("multihop_qa", {"difficulty": 9}),
                                       ("sokoban", {"difficulty": 0}),
                                       ("calculator", {"difficulty": "hard"}),
                                       ("multihop_qa", {"top_k": 0}),
                                       ("multihop_qa", {"max_hops": 5}),
                                       ("multihop_qa", {"min_hops": 3, "max_hops": 2})])
def test_bad_options_are_rejected_with_the_field_name(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make(name, **bad)
