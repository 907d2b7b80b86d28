"""Scripted policies behind the sampler interface: expert demonstrations for SFT.

``ScriptedSampler`` answers ``step()`` like ``steppo_jax.sampling.Sampler`` but its replies
come from a Python function, so demonstrations go through the same rollout loop — and get
exactly the token layout the RL policy will see.
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Sequence

import numpy as np

from steppo_jax.sampling import StepOutput


class ScriptedSampler:
    """reply(row, step, context) -> text, where context is the decoded text of the tokens
    just appended to the row (prompt or observation); every reply is closed with the first
    stop id.

    Log-probs are reported as 0 (the demonstration is not sampled from a model).
    """

    def __init__(self, tokenizer, batch_size: int, reply: Callable[[int, int, str], str], max_new_tokens: int = 256):
        self.tokenizer, self.batch_size, self.reply, self.max_new_tokens = tokenizer, batch_size, reply, max_new_tokens
        self._step = 0

    def step(self, new_tokens: Sequence[Sequence[int] | None], stop_ids, key, reset=False) -> StepOutput:
        if reset is True:
            self._step = 0
        tokens, logprobs = [], []
        for row, new in enumerate(new_tokens):
            ids = []
            if new is not None:
                context = self.tokenizer.decode(list(new), skip_special_tokens=True)
                ids = self.tokenizer.encode(self.reply(row, self._step, context), add_special_tokens=False)
                if len(ids) >= self.max_new_tokens:  # a cut demonstration would teach broken replies
                    raise ValueError(f"a scripted reply of {len(ids)} tokens (+1 end of turn) exceeds "
                                     f"max_new_tokens={self.max_new_tokens}; raise rollout.max_new_tokens")
                ids = ids + [stop_ids[0]]
            tokens.append(ids)
            logprobs.append(np.zeros(len(ids), np.float32))
        self._step += 1
        return StepOutput(tokens, logprobs, np.array([t is not None for t in new_tokens]))


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_']+")


def random_tool_call(tools: Sequence[dict], context: str, rng: random.Random) -> str:
    """A well-formed but arbitrary call of one of ``tools``: string arguments are words of
    ``context``, numbers small integers, enums a random choice."""
    schema = rng.choice(list(tools))
    fn = schema.get("function", schema)
    words = _WORD.findall(context) or ["x"]
    args = {}
    for name, spec in fn.get("parameters", {}).get("properties", {}).items():
        if "enum" in spec:
            args[name] = rng.choice(spec["enum"])
        elif spec.get("type") in ("integer", "number"):
            args[name] = rng.randint(0, 20)
        else:
            args[name] = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
    return "Let me try this.\n<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}) + "\n</tool_call>"


class NoisyExpert:
    """reply function for ``ScriptedSampler``: the environment's expert action, except that
    with probability ``mistake`` it is the environment's characteristic mistake
    (``env.mistake_action()``, where it has one for the current state) and otherwise, with
    probability ``noise``, a random well-formed tool call. The demonstrations, and the policy
    cloned from them, thus make mistakes that RL can fix."""

    def __init__(self, envs: list, noise: float, seed: int, mistake: float = 0.0):
        self.envs, self.noise, self.mistake, self.rng = envs, noise, mistake, random.Random(seed)

    def __call__(self, row: int, step: int, context: str) -> str:
        env = self.envs[row]
        if self.rng.random() < self.mistake:
            wrong = getattr(env, "mistake_action", lambda: None)()
            if wrong is not None:
                return wrong
        if self.rng.random() < self.noise and getattr(env, "tools", None):
            return random_tool_call(env.tools, context, self.rng)
        return env.expert_action()
