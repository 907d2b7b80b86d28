"""The host loop: environments <-> sampler, one policy step at a time, token-exactly.

For a batch of tasks and G rollouts per task (a group), every trajectory starts from its
environment's opening messages rendered by the chat template. Each round, the sampler
decodes one reply for every live trajectory (continuing its KV cache), the replies go to
the environments (concurrently, under a timeout), and each observation is appended as
the template *delta* of the new messages only — the history is never re-tokenized, so
the packed tokens are exactly the prompt ids, the sampled ids and the delta ids.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from steppo_jax.envs.base import Environment
from steppo_jax.envs.pool import EnvPool
from steppo_jax.rollout.records import TrajectoryRecord, anchor_id
from steppo_jax.sampling import StepOutput
from steppo_jax.tokenizer import render_delta


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """max_steps: policy steps per episode; max_context: tokens a trajectory may hold;
    history_window: when set, each step's prompt is rebuilt from the opening messages and
    the last ``history_window`` exchanges (per-step rows layout) instead of growing."""

    max_steps: int
    max_context: int
    history_window: int | None = None


@dataclasses.dataclass
class RolloutTimings:
    """What a rollout spent, summed over ``collect`` calls: host seconds in sampler calls,
    waiting for environments and in host glue; decoded tokens and the slot-steps sampling
    ran (`StepOutput.slot_steps`, padding rows included): their ratio is the slot utilisation."""

    sampler_s: float = 0.0
    env_s: float = 0.0
    glue_s: float = 0.0
    decoded_tokens: int = 0
    slot_steps: int = 0

    def count_call(self, out: StepOutput) -> None:
        """Counts one sampler call's tokens and slot-steps."""
        self.decoded_tokens += sum(map(len, out.tokens))
        self.slot_steps += out.slot_steps

    @property
    def slot_utilisation(self) -> float:
        """Useful decoded tokens / slot-steps (1 when nothing was decoded)."""
        return self.decoded_tokens / self.slot_steps if self.slot_steps else 1.0


class ChatCodec:
    """Token ids for prompts, observation deltas and replies, from a chat tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.eos_token
        self.end_ids = tokenizer.encode(self.end_of_turn, add_special_tokens=False)
        self.stop_ids = [tokenizer.convert_tokens_to_ids(self.end_of_turn)]

    def prompt(self, messages, tools) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def delta(self, messages, *, reply_closed: bool) -> list[int]:
        """Ids to append after a reply: its end-of-turn if the sampler did not emit one,
        then the new messages and the next generation prompt."""
        ids = [] if reply_closed else list(self.end_ids)
        return ids + self.tokenizer.encode(render_delta(messages, self.tokenizer), add_special_tokens=False)

    def reply_text(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text[: -len(self.end_of_turn)] if text.endswith(self.end_of_turn) else text


class RolloutEngine:
    """Runs groups of episodes with a ``Sampler`` whose batch size is the number of trajectories.

    make_env: builds a fresh environment (one per trajectory per call).
    sampler: ``steppo_jax.sampling.Sampler`` (``step(new_tokens, stop_ids, key, reset)``).
    """

    def __init__(self, make_env: Callable[[], Environment], tokenizer, sampler, settings: RolloutSettings,
                 pool: EnvPool):
        self.make_env, self.codec, self.sampler = make_env, ChatCodec(tokenizer), sampler
        self.settings, self.pool = settings, pool
        if sampler.max_new_tokens >= settings.max_context:
            raise ValueError(f"max_new_tokens={sampler.max_new_tokens} must be below max_context={settings.max_context}")

    def collect(self, tasks: Sequence[tuple[int, int]], group_size: int, key: jax.Array,
                timings: RolloutTimings | None = None) -> list[TrajectoryRecord]:
        """Rolls out ``group_size`` episodes of each (task_id, seed); returns B = len(tasks) * G records."""
        timings = timings or RolloutTimings()
        B = len(tasks) * group_size
        if B != self.sampler.batch_size:
            raise ValueError(f"{len(tasks)} tasks x group {group_size} = {B} trajectories, "
                             f"but the sampler holds {self.sampler.batch_size} rows")
        envs, records, new, opening = self._start(tasks, group_size, timings)
        rebuild = self.settings.history_window is not None
        for k in range(self.settings.max_steps):
            t0 = time.perf_counter()
            live = [i for i in range(B) if records[i].live and (not rebuild or self._rebuild(records[i], opening[i], new, i))]
            if not live:
                break
            out = self.sampler.step([new[i] if records[i].live else None for i in range(B)], self.codec.stop_ids,
                                    jax.random.fold_in(key, k), reset=(k == 0 or rebuild))
            timings.sampler_s += time.perf_counter() - t0
            timings.count_call(out)
            t0 = time.perf_counter()
            actions = [self._act(records[i], out.tokens[i], out.logprobs[i], out.version) for i in live]
            timings.glue_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            results = self.pool.step([envs[i] for i in live], actions)
            timings.env_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for i, res in zip(live, results):
                self._advance(records[i], res, bool(out.stopped[i]), k, new, i)
            timings.glue_s += time.perf_counter() - t0
        self._finish(records, opening)
        return records

    def _start(self, tasks: Sequence[tuple[int, int]], group_size: int, timings: RolloutTimings):
        """Fresh environments reset for each trajectory; returns (envs, records, the first new
        ids of each trajectory, its opening messages)."""
        t0 = time.perf_counter()
        B = len(tasks) * group_size
        envs = [self.make_env() for _ in range(B)]
        records = [TrajectoryRecord(task_id=t, seed=s, group=g) for g, (t, s) in enumerate(tasks) for _ in range(group_size)]
        resets = self.pool.reset(envs, [r.task_id for r in records], [r.seed for r in records])
        timings.env_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        new: list[list[int] | None] = [None] * B
        opening: list[list[dict[str, Any]]] = [[] for _ in range(B)]
        for i, (rec, res) in enumerate(zip(records, resets)):
            if not res.ok:
                rec.failed, rec.live = f"reset: {res.error}", False
                continue
            rec.messages, rec.tools = list(res.value.messages), list(res.value.tools)
            opening[i] = list(res.value.messages)
            rec.anchors.append(anchor_id(res.value.anchor))
            new[i] = self.codec.prompt(rec.messages, rec.tools)
            rec.append_context(new[i])
            if self.settings.history_window is not None:
                rec.contexts = []
            if len(new[i]) + self.sampler.max_new_tokens > self.settings.max_context:
                rec.failed, rec.live = f"prompt of {len(new[i])} tokens leaves no room in max_context", False
        timings.glue_s += time.perf_counter() - t0
        return envs, records, new, opening

    def _rebuild(self, rec: TrajectoryRecord, opening: list[dict[str, Any]], new: list, i: int) -> bool:
        """History windows: the prompt of the trajectory's next step, rebuilt into new[i];
        False (and the trajectory ended) when it leaves no room for a reply."""
        new[i] = self._window_prompt(rec, opening)
        if len(new[i]) + self.sampler.max_new_tokens > self.settings.max_context:
            # no room for a reply; without room for the window itself, no state either
            rec.truncated, rec.live = True, False
            rec.overflowed = len(new[i]) > self.settings.max_context
            return False
        rec.contexts.append(new[i])
        return True

    def _act(self, rec: TrajectoryRecord, ids: list[int], logprobs, version: int) -> str:
        """Records a reply sampled by policy ``version``; returns its text, the action sent to
        the environment."""
        rec.append_action(ids, logprobs, version)
        text = self.codec.reply_text(ids)
        rec.messages.append({"role": "assistant", "content": text})
        return text

    def _finish(self, records: list[TrajectoryRecord], opening: list[list[dict[str, Any]]]) -> None:
        for rec, first in zip(records, opening):
            if rec.live:  # ran out of steps without the environment ending the episode
                rec.truncated, rec.live = True, False
            if rec.contexts is not None and rec.has_final_state:  # the context a next step would see
                final = self._window_prompt(rec, first)
                if len(final) > self.settings.max_context:
                    rec.overflowed = True  # no room for the state itself: bootstrap 0
                else:
                    rec.contexts.append(final)

    def _advance(self, rec: TrajectoryRecord, res, closed: bool, k: int, new: list, i: int) -> None:
        """Applies one environment answer to a trajectory."""
        if not res.ok:
            rec.failed, rec.live = f"step {k}: {res.error}", False
            return
        step = res.value
        rec.rewards.append(float(step.reward))
        rec.invalid_calls += bool(step.info.get("invalid_call", False))
        rec.messages.extend(step.messages)
        if step.done or step.truncated:
            rec.terminated, rec.truncated = step.done, step.truncated and not step.done
            rec.success = bool(step.info.get("success", False))
            rec.live = False
        last_step = k + 1 >= self.settings.max_steps
        if step.done:
            return
        delta = self.codec.delta(step.messages, reply_closed=closed) if step.messages else []
        grows = self.settings.history_window is None  # else each window is checked when it is built
        if grows and len(rec.tokens) + len(delta) > self.settings.max_context:
            rec.truncated, rec.overflowed, rec.live = True, True, False  # no state to bootstrap from
            return
        # The observation is kept even when no step follows: the bootstrap value of a
        # truncated trajectory reads the state that includes it (see steppo_jax.types).
        rec.append_context(delta)
        new[i] = delta
        if grows and len(rec.tokens) + self.sampler.max_new_tokens > self.settings.max_context:
            rec.truncated, rec.live = True, False  # the next step would not fit
        elif rec.live and not last_step:
            rec.anchors.append(anchor_id(step.anchor))
        elif last_step:
            rec.truncated, rec.live = not rec.terminated, False

    def _window_prompt(self, rec: TrajectoryRecord, opening: list[dict[str, Any]]) -> list[int]:
        """The opening messages plus the last ``history_window`` exchanges, rendered afresh.

        An exchange is one assistant reply and the messages the environment answered it with
        (any number of them), so the cut falls at an assistant message."""
        history = rec.messages[len(opening):]
        replies = [j for j, m in enumerate(history) if m["role"] == "assistant"]
        window = self.settings.history_window
        cut = replies[-window] if 0 < window <= len(replies) else (0 if window else len(history))
        return self.codec.prompt(opening + history[cut:], rec.tools)


STAT_KEYS = ("steps", "tokens", "action_tokens", "return", "success", "invalid_calls", "terminated")
"""The per-trajectory stats of ``stats_table`` (after its ``failed`` column)."""


def stats_table(records: Sequence[TrajectoryRecord]) -> np.ndarray:
    """[N, 1 + len(STAT_KEYS)] float64: each trajectory's failed flag, then its ``STAT_KEYS``
    (a table processes can concatenate before ``table_stats``)."""
    rows = [[r.failed is not None] + [r.stats()[k] for k in STAT_KEYS] for r in records]
    return np.array(rows, np.float64).reshape(len(records), 1 + len(STAT_KEYS))


def table_stats(table: np.ndarray) -> dict[str, float]:
    """Batch means of a ``stats_table`` (failed trajectories counted, not averaged in)."""
    ok = table[table[:, 0] == 0, 1:]
    out = {"trajectories": float(len(table)), "failed": float(len(table) - len(ok))}
    if len(ok):
        out |= {key: float(np.mean(ok[:, i])) for i, key in enumerate(STAT_KEYS)}
    return out


def rollout_stats(records: Sequence[TrajectoryRecord]) -> dict[str, float]:
    """Batch means of the per-trajectory stats (failed trajectories counted, not averaged in)."""
    return table_stats(stats_table(records))
