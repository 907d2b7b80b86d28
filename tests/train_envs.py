"""Small environments for trainer tests (registered by the tests that use them)."""

from __future__ import annotations

import dataclasses
import math

from steppo_jax.envs.base import Reset
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

COLOURS = ["red", "green", "blue", "gold"]
TARGET = ["green", "gold"]


class ChainEnv(ToolEnv):
    """Two picks among four colours; each right pick earns 0.5, success is both right (the
    same target for every task: a two-step credit problem a tiny model learns in a few
    iterations). ``nan_task`` makes that task's rewards NaN (fault tests);
    ``raise_task`` makes its steps raise."""

    name = "chain_test"

    def __init__(self, *, max_steps: int = 2, max_invalid_calls: int = 3, nan_task: int = -1, raise_task: int = -1):
        super().__init__(max_steps=max_steps, max_invalid_calls=max_invalid_calls, invalid_penalty=0.0)
        self.nan_task, self.raise_task = nan_task, raise_task

    def _new_task(self, task_id: int, seed: int) -> Reset:
        self.task_id, self.picks = task_id, []
        tools = [tool_schema("pick", "Pick a colour.", {"colour": {"type": "string", "enum": COLOURS}})]
        return Reset([{"role": "user", "content": "Pick two colours."}], tools, self.anchor())

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        self.picks.append(call.arguments["colour"])
        reward = 0.5 * (self.picks[-1] == TARGET[len(self.picks) - 1])
        if len(self.picks) < 2:
            return ToolOutcome(f"You picked {self.picks[-1]}.", reward=reward)
        return ToolOutcome("Done.", reward=reward, done=True, success=self.picks == TARGET)

    def step(self, action_text: str):
        if self.task_id == self.raise_task:
            raise RuntimeError("chain_test: injected failure")
        result = super().step(action_text)
        if self.task_id == self.nan_task:  # every step, valid reply or not
            result = dataclasses.replace(result, reward=math.nan)
        return result

    def anchor(self) -> str:
        return ",".join(self.picks) if hasattr(self, "picks") else ""

    def expert_action(self) -> str:
        return "Next colour.\n" + format_tool_call("pick", {"colour": TARGET[len(self.picks)]})
