"""Adapters to third-party environments: full scripted episodes, bad input, determinism."""

import concurrent.futures
import os
import random
import subprocess
import sys

import pytest

from tests.env_policies import run_episode, success_rate
from steppo_jax.envs import Environment, make, parse_tool_call
from steppo_jax.envs.tools import format_tool_call

ADAPTERS = {"frozenlake": "gymnasium", "textarena": "textarena", "textworld": "textworld"}


@pytest.fixture(scope="session")
def tw_cache(tmp_path_factory):
    """One game cache per test run, shared by pytest-xdist workers (games are written
    atomically, so concurrent workers can fill it)."""
    pytest.importorskip("textworld")
    base = tmp_path_factory.getbasetemp()
    return str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tw_games")


def build(name, tw_cache=None, **options):
    pytest.importorskip(ADAPTERS[name])
    if name == "textworld":
        options["cache_dir"] = tw_cache
    return make(name, **options)


# --- every adapter -----------------------------------------------------------------------------

CASES = [("frozenlake", {}), ("frozenlake", {"size": 8}),
         ("textarena", {"game": "GuessTheNumber-v0"}),
         ("textarena", {"game": "TowerOfHanoi-v0-medium"}),
         ("textworld", {})]
IDS = ["frozenlake-4", "frozenlake-8", "guess-the-number", "hanoi-4", "textworld"]


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_scripted_expert_plays_full_episodes_to_success(name, options, tw_cache):
    env = build(name, tw_cache, **options)
    assert isinstance(env, Environment)
    for task_id in range(3 if name == "textworld" else 20):
        reset, steps = run_episode(env, task_id, seed=0)
        assert [m["role"] for m in reset.messages] == ["system", "user"]
        assert reset.tools and isinstance(reset.anchor, str)
        for action, result in steps[:-1]:
            assert parse_tool_call(action, reset.tools).kind == "call"
            assert [m["role"] for m in result.messages] == ["tool"]
            assert not (result.done or result.truncated or result.info["invalid_call"])
        last = steps[-1][1]
        assert last.done and not last.truncated and last.info["success"], last
        assert last.reward > 0 and last.messages == [] and last.info["feedback"]


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_random_policy_rarely_succeeds(name, options, tw_cache):
    env = build(name, tw_cache, **options)
    assert success_rate(env, 3 if name == "textworld" else 30, policy="random") <= 0.1


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_same_task_and_seed_replay_the_same_episode(name, options, tw_cache):
    first, second = build(name, tw_cache, **options), build(name, tw_cache, **options)
    reset_a, steps_a = run_episode(first, 1, seed=0)
    run_episode(first, 2, seed=0)  # state from another task must not leak
    reset_b, steps_b = run_episode(second, 1, seed=0)
    assert reset_a == reset_b and steps_a == steps_b


# TowerOfHanoi is left out: it has a single start position.
@pytest.mark.parametrize("name, options", CASES[:3] + CASES[4:], ids=IDS[:3] + IDS[4:])
def test_different_tasks_or_seeds_give_different_tasks(name, options, tw_cache):
    env = build(name, tw_cache, **options)
    pairs = [(0, 0), (1, 0), (2, 0), (0, 1)] if name == "textworld" else [
        (t, s) for t in range(4) for s in range(2)]
    starts = {(str(r.messages), r.anchor) for r in (env.reset(t, s) for t, s in pairs)}
    assert len(starts) >= len(pairs) - 1


BAD_REPLIES = [
    ("", "empty reply"),
    ("Let me think about it.", "no tool call"),
    ('<tool_call>{"name": "move", "arguments": {"direction": </tool_call>', "invalid JSON"),
    ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', "unknown tool 'fly'"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
    ("x" * 2100, "reply too long"),
]


@pytest.mark.parametrize("name, options", CASES[::2], ids=IDS[::2])
@pytest.mark.parametrize("reply, fragment", BAD_REPLIES, ids=[f for _, f in BAD_REPLIES])
def test_malformed_replies_become_error_observations(name, options, reply, fragment, tw_cache):
    env = build(name, tw_cache, **options)
    reset = env.reset(0, 0)
    result = env.step(reply)
    assert result.info["invalid_call"] and fragment in result.messages[0]["content"]
    assert result.reward < 0 and not result.done and not result.truncated
    assert result.anchor == reset.anchor
    assert finish_with_expert(env).info["success"]


def finish_with_expert(env):
    """Play the current episode to its end with the expert; returns the last StepResult."""
    result = None
    while result is None or not (result.done or result.truncated):
        result = env.step(env.expert_action())
    return result


@pytest.mark.parametrize("name, options, call", [
    ("frozenlake", {}, format_tool_call("move", {"direction": "north"})),
    ("frozenlake", {}, format_tool_call("move", {"direction": 3})),
    ("textarena", {}, format_tool_call("play", {"move": "[3]"})),
    ("textworld", {}, format_tool_call("execute", {})),
], ids=["enum", "type", "argument-name", "missing-argument"])
def test_wrong_arguments_are_rejected_and_repeated_errors_end_the_episode(name, options, call,
                                                                   tw_cache):
    env = build(name, tw_cache, max_invalid_calls=2, **options)
    env.reset(0, 0)
    first, second = env.step(call), env.step(call)
    assert first.info["invalid_call"] and not first.done
    assert second.done and not second.truncated and second.info["ended_reason"] == "invalid_calls"
    assert not second.info["success"]


@pytest.mark.parametrize("name, module", list(ADAPTERS.items()))
def test_missing_extra_names_the_install_command(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'steppo_jax\[envs\]'"):
        make(name)


@pytest.mark.parametrize("name, options, message", [
    ("frozenlake", {"size": 1}, "size must be >= 2"),
    ("frozenlake", {"p_frozen": 0.0}, r"p_frozen must be in \(0, 1\]"),
    ("textworld", {"quest_length": 0}, "quest_length must be >= 1"),
    ("textarena", {"max_steps": 0}, "max_steps must be >= 1"),
])
def test_bad_options_are_rejected(name, options, message):
    pytest.importorskip(ADAPTERS[name])
    with pytest.raises(ValueError, match=message):
        make(name, **options)


# --- FrozenLake ------------------------------------------------------------------------------

def test_frozenlake_renders_plain_text_grid_matching_the_map():
    env = build("frozenlake", size=5)
    reset = env.reset(3, 0)
    grid = reset.messages[1]["content"]
    assert "\x1b" not in grid and grid == reset.anchor
    rows = grid.split("\n")
    assert len(rows) == 5 and all(len(r) == 5 for r in rows) and grid.count("P") == 1
    assert [r.replace("P", "S") for r in rows] == reset.info["map"]


def test_frozenlake_edge_hole_and_slippery_outcomes():
    env = build("frozenlake")
    env.reset(0, 0)
    result = env.step(format_tool_call("move", {"direction": "up"}))
    assert "stayed in place" in result.messages[0]["content"] and not result.done
    # A map with a hole next to the start: stepping in ends the episode as a failure.
    task_id = next(t for t in range(200) if env.reset(t, 0).info["map"][1][0] == "H")
    env.reset(task_id, 0)
    result = env.step(format_tool_call("move", {"direction": "down"}))
    assert result.done and not result.info["success"] and result.reward == 0.0
    assert result.info["feedback"] == "You fell into a hole."
    slippery = build("frozenlake", is_slippery=True)
    texts = []
    for task_id in range(10):
        reset, steps = run_episode(slippery, task_id, seed=0)
        assert steps[-1][1].done or steps[-1][1].truncated
        assert len(steps) <= slippery.max_steps
        texts += [m["content"] for _, r in steps for m in r.messages]
    assert any("but slid" in text for text in texts)


# --- TextArena -------------------------------------------------------------------------------

def test_textarena_game_rejects_an_illegal_move_then_ends_the_game():
    env = build("textarena", game="TowerOfHanoi-v0")
    env.reset(0, 0)
    illegal = format_tool_call("play", {"action": "[B C]"})  # tower B is empty
    warned = env.step(illegal)
    assert "invalid move" in warned.messages[0]["content"] and not warned.done
    assert not warned.info["invalid_call"]  # a well-formed call: the game judges the move
    ended = env.step(illegal)
    assert ended.done and not ended.info["success"] and ended.info["invalid_move"]


def test_textarena_reset_leaves_global_random_alone_and_checks_the_game():
    env = build("textarena")
    random.seed(123)
    expected = random.random()
    random.seed(123)
    env.reset(4, 0)
    assert random.random() == expected
    with pytest.raises(ValueError, match="unknown TextArena game 'NoSuchGame-v0'"):
        make("textarena", game="NoSuchGame-v0")
    mastermind = make("textarena", game="Mastermind-v0")
    mastermind.reset(0, 0)
    with pytest.raises(NotImplementedError, match="no scripted expert for 'Mastermind-v0'"):
        mastermind.expert_action()


def test_textarena_concurrent_resets_match_serial_ones():
    envs = [build("textarena") for _ in range(16)]
    serial = [env.reset(task_id, 0).anchor for task_id, env in enumerate(envs)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda i: envs[i].reset(i, 0).anchor, range(16)))
    assert parallel == serial and len(set(serial)) > 5


# --- TextWorld -------------------------------------------------------------------------------

def test_textworld_admissible_commands_interface(tw_cache):
    env = build("textworld", tw_cache)
    reset = env.reset(0, 0)
    listed = env.step(format_tool_call("admissible_commands", {}))
    assert listed.messages[0]["content"].startswith("Admissible commands:\n")
    commands = listed.messages[0]["content"].split("\n")[1:]
    assert "look" in commands and listed.anchor == reset.anchor
    refused = env.step(format_tool_call("execute", {"command": "quit"}))
    assert "not an admissible command" in refused.messages[0]["content"]
    assert refused.info["invalid_move"] and refused.anchor == reset.anchor
    # Case and spacing are forgiven; the expert's command changes the state.
    command = env.expert_action().split('"command": "')[1].split('"')[0]
    moved = env.step(format_tool_call("execute", {"command": "  " + command.upper() + " "}))
    assert not moved.info["invalid_move"] and moved.anchor != reset.anchor
    env.close()


def test_textworld_rewards_sum_to_the_score_and_games_are_cached(tmp_path):
    env = build("textworld", str(tmp_path))
    path = env.game_file(0, 0)
    mtime = os.path.getmtime(path)
    reset, steps = run_episode(env, 0, 0)
    assert steps[-1][1].info["success"]
    assert sum(r.reward for _, r in steps) == reset.info["max_score"] > 0
    assert os.path.getmtime(env.game_file(0, 0)) == mtime
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)[:-3] + ".json",
                                            os.path.basename(path)]


def test_generated_game_is_the_one_tw_make_makes(tmp_path):
    pytest.importorskip("textworld")
    from steppo_jax.envs.adapters import textworld_env
    tw_make = os.path.join(os.path.dirname(sys.executable), "tw-make")
    if not os.path.exists(tw_make):
        pytest.skip("tw-make is not installed next to this interpreter")
    textworld_env.generate_game(str(tmp_path / "ours.z8"), 11, world_size=2, nb_objects=3,
                                quest_length=2)
    subprocess.run([sys.executable, tw_make, "custom", "--world-size", "2", "--nb-objects", "3",
                    "--quest-length", "2", "--seed", "11", "--output",
                    str(tmp_path / "cli.z8"), "--silent"], check=True, timeout=120)
    assert (tmp_path / "ours.z8").read_bytes() == (tmp_path / "cli.z8").read_bytes()
