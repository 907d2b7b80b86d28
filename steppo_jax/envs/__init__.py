"""Host-side environments and tool parsing: plain Python, no JAX.

An environment is a multi-turn task an agent solves by talking to it. Messages are chat dicts
(``{"role": "system" | "user" | "tool", "content": str}``) so the rollout loop can render them
with any tokenizer's chat template. Life of an episode::

    env = steppo_jax.envs.make("multihop_qa", difficulty=2)
    reset = env.reset(task_id=17, seed=0)     # opening messages + tool schemas
    result = env.step(action_text)            # one policy step = one full reply
    ... until result.done or result.truncated; result.info["success"] at the end

Built-in environments: ``multihop_qa`` (the default demo), ``hotpotqa``, ``sokoban``,
``calculator``; adapters (optional extras): ``frozenlake``, ``textarena``, ``textworld``.
"""

from steppo_jax.envs.base import Environment, Reset, StepResult, TaskSplit
from steppo_jax.envs.pool import CallResult, EnvPool
from steppo_jax.envs.processes import ProcessEnvs, RemoteError
from steppo_jax.envs.registry import make, register, registered, resolve
from steppo_jax.envs.tools import (ParsedReply, ToolCall, ToolEnv, ToolOutcome,
                                   format_tool_call, parse_tool_call, tool_schema)

__all__ = [
    "CallResult", "EnvPool", "Environment", "ParsedReply", "ProcessEnvs", "RemoteError", "Reset", "StepResult",
    "TaskSplit", "ToolCall", "ToolEnv", "ToolOutcome", "format_tool_call", "make", "parse_tool_call", "register",
    "registered", "resolve", "tool_schema",
]
