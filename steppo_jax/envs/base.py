"""The environment protocol: plain Python, no JAX.

An environment is a multi-turn task an agent solves by talking to it. Messages are
chat dicts (``{"role": "user" | "tool" | "system", "content": str}``) so the rollout
loop can render them with any tokenizer's chat template.

Life of an episode::

    env = steppo_jax.envs.make("multihop_qa", difficulty=2)
    reset = env.reset(task_id=17, seed=0)     # opening messages + tool schemas
    result = env.step(action_text)            # one policy step = one full reply
    ... until result.done or result.truncated
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Reset:
    """What an environment hands the agent at the start of an episode.

    messages: the opening chat messages (system and user turns).
    tools: JSON tool schemas (OpenAI/Hermes style) rendered by the chat template.
    anchor: hashable description of the initial state (GiGPO step groups).
    info: anything else (task id, gold answer for logging, ...).
    """

    messages: list[dict[str, str]]
    tools: list[dict[str, Any]]
    anchor: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """The environment's answer to one policy step.

    messages: observation messages to append (usually one ``tool`` or ``user`` turn);
      empty when the episode ends without further observation.
    reward: reward of this step.
    done: reached a terminal state (bootstrap value 0).
    truncated: stopped for an external reason (step limit, too many invalid calls);
      the trainer bootstraps with the critic's value.
    anchor: hashable description of the state after the step (GiGPO step groups).
    info: diagnostics. Tool environments always set ``invalid_call`` (bool); the step that ends
      the episode (done or truncated) sets ``success`` (bool) and ``steps``; a truncation sets
      ``truncated_reason`` (``"max_steps"`` or ``"invalid_calls"``); QA environments add
      ``em``/``f1`` when an answer is graded.
    """

    messages: list[dict[str, str]]
    reward: float
    done: bool
    truncated: bool
    anchor: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """Which task ids are trained on and which are held out: disjoint ranges of one id space.

    train: ids training draws from (the whole training source where it is finite).
    eval: held-out ids for evaluation; none of them is in ``train``.
    """

    train: range
    eval: range

    def __post_init__(self):
        for name, ids in (("train", self.train), ("eval", self.eval)):
            if ids.step != 1 or ids.start < 0:
                raise ValueError(f"TaskSplit.{name} must be a range of non-negative ids with step 1, got {ids}")
        lo, hi = max(self.train.start, self.eval.start), min(self.train.stop, self.eval.stop)
        if lo < hi:
            raise ValueError(f"training ids {self.train.start}..{self.train.stop - 1} and held-out ids "
                             f"{self.eval.start}..{self.eval.stop - 1} overlap in {lo}..{hi - 1}")


@runtime_checkable
class Environment(Protocol):
    """One episode at a time; a rollout creates one instance per concurrent trajectory."""

    name: str
    max_steps: int

    def reset(self, task_id: int, seed: int) -> Reset: ...

    def step(self, action_text: str) -> StepResult: ...

    def expert_action(self) -> str:
        """A reply (reasoning + tool call) that makes progress from the current state."""
        ...

    # Optional: ``task_split -> TaskSplit`` (a property), for an environment whose tasks come
    # from a finite source with its own held-out part (hotpotqa: a train file and an eval
    # file). Without it, every id names a generated task and the trainer splits the ids itself.
    # Optional: ``mistake_action() -> str | None``, the environment's characteristic wrong
    # reply from the current state (None where it has none). SFT demonstrations mix it in
    # (``sft.mistake``) so the cloned policy has a systematic error that RL must fix.
