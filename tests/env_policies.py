"""Policies and an episode runner shared by the environment tests."""

import random
import re

from steppo_jax.envs.tools import format_tool_call


def random_action(rng: random.Random, tools, history) -> str:
    """A well-formed call of a random tool with random arguments: enum values, words seen in
    the conversation, or integers in [0, 100]."""
    tool = rng.choice(tools)["function"]
    words = re.findall(r"[A-Za-z]+", " ".join(m["content"] for m in history)) or ["x"]
    arguments = {}
    for key, schema in tool["parameters"]["properties"].items():
        if "enum" in schema:
            arguments[key] = rng.choice(schema["enum"])
        elif schema["type"] == "string":
            arguments[key] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        else:
            arguments[key] = rng.randint(0, 100)
    return "Trying something.\n" + format_tool_call(tool["name"], arguments)


def run_episode(env, task_id, seed, policy="expert", rng=None):
    """Play one episode; returns (reset, list of (action, StepResult))."""
    reset = env.reset(task_id, seed)
    history, steps = list(reset.messages), []
    for _ in range(env.max_steps):
        action = env.expert_action() if policy == "expert" else random_action(
            rng, reset.tools, history)
        result = env.step(action)
        steps.append((action, result))
        history += result.messages
        if result.done or result.truncated:
            break
    return reset, steps


def success_rate(env, num_tasks=200, seed=0, policy="expert"):
    rng = random.Random(1234)
    wins = 0
    for task_id in range(num_tasks):
        _, steps = run_episode(env, task_id, seed, policy, rng)
        wins += bool(steps[-1][1].info["success"])
    return wins / num_tasks
