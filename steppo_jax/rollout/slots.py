"""Continuous batching over agent steps: B cache slots serve N trajectories, envs off the critical path.

Each slot of the sampler is an independent conversation with its own KV region. One sampler
call (``Sampler.decode``) draws a chunk of at most K tokens for up to D busy slots (the
sampler's ``decode_rows``; D = B by default; a call runs its busy slots' rows only, so idle
slots cost nothing, and ends early once a few of its rows have finished); between chunks
the host retires the replies that ended (each goes to its environment at once, on the pool,
while decoding goes on) and refills the decode rows with pending work: the next step of a
trajectory whose environment has answered, in its own slot (a trajectory keeps its slot, and
so its cache, for its whole episode: only the observation is prefilled), and new
trajectories, each into an empty slot or one whose trajectory has ended. With more trajectories than slots, new ones wait for a slot.
A slot whose trajectory waits on its environment keeps its cache; with D < B its decode row
serves another slot meanwhile (the call reads and writes the D busy slots' rows of the cache), so more
slots than decode rows keep every row busy, at the memory of B caches.

A reply is drawn with the key of its (step, trajectory) (``sampling.reply_keys``), the key
the step-synchronous ``RolloutEngine`` gives it, so where a slot runs a reply and how it is
cut into chunks do not change the tokens: greedy decoding yields the same trajectories as the
synchronous engine, and sampling does too up to floating-point ties.
"""

from __future__ import annotations

import collections
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steppo_jax.envs.pool import Call
from steppo_jax.rollout.engine import RolloutEngine, RolloutTimings
from steppo_jax.rollout.records import TrajectoryRecord
from steppo_jax.sampling import reply_keys


class SlotEngine(RolloutEngine):
    """``RolloutEngine``'s episodes, held in ``sampler.batch_size`` slots and decoded
    ``sampler.decode_rows`` at a time in chunks of ``chunk`` tokens; any number of
    trajectories per ``collect``."""

    def __init__(self, make_env, tokenizer, sampler, settings, pool, *, chunk: int):
        super().__init__(make_env, tokenizer, sampler, settings, pool)
        if not 1 <= chunk <= sampler.max_new_tokens:
            raise ValueError(f"decode chunk {chunk} must be in [1, max_new_tokens={sampler.max_new_tokens}]")
        self.chunk = chunk

    def collect(self, tasks: Sequence[tuple[int, int]], group_size: int, key: jax.Array,
                timings: RolloutTimings | None = None) -> list[TrajectoryRecord]:
        """Rolls out ``group_size`` episodes of each (task_id, seed); returns N = len(tasks) * G
        records, trajectory i's replies drawn as row ``sampler.first_row + i`` of the
        synchronous engine's batch."""
        timings = timings or RolloutTimings()
        envs, records, new, opening = self._start(tasks, group_size, timings)
        t0 = time.perf_counter()
        N, B, K = len(records), self.sampler.batch_size, self.chunk
        D = self.sampler.decode_rows  # replies decoded at once (B: every slot)
        rebuild = self.settings.history_window is not None
        home = np.full(N, -1)  # the slot holding trajectory i's cache
        owner = np.full(B, -1)  # the trajectory whose cache slot b holds
        busy = np.full(B, -1)  # the trajectory decoding in slot b
        offsets = np.zeros(B, np.int32)
        versions = np.zeros(B, np.int64)  # the policy version of the chunk each slot's reply began in
        replies: list[tuple[list[int], list[float]]] = [([], []) for _ in range(B)]
        start: list[list[int] | None] = [None] * B  # ids a slot prefills before its next chunk
        reset = np.zeros(B, bool)
        closed = np.zeros(N, bool)
        waiting: dict[int, Call] = {}  # trajectory -> its environment's pending step
        # trajectories whose next step can be decoded (a rebuilt prompt is built as it joins)
        ready = collections.deque(i for i in range(N)
                                  if records[i].live and (not rebuild or self._rebuild(records[i], opening[i], new, i)))
        timings.glue_s += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            finished = self.pool.wait(list(waiting.values()), timeout=0) if waiting else []
            for i in sorted(i for i, call in waiting.items() if call in finished):
                rec = records[i]
                self._advance(rec, waiting.pop(i).result(), bool(closed[i]), rec.num_steps, new, i)
                if rec.live and (not rebuild or self._rebuild(rec, opening[i], new, i)):
                    ready.append(i)
            room = D - int(np.sum(busy >= 0))  # decode rows free for this chunk
            for i in [i for i in ready if home[i] >= 0][:room]:  # a trajectory keeps its slot (and cache)
                b = home[i]
                busy[b], start[b], reset[b], offsets[b] = i, new[i], rebuild, 0
                ready.remove(i)
                room -= 1
            while ready and room > 0 and (b := self._free_slot(owner, busy, records)) is not None:
                room -= 1
                i = ready.popleft()
                owner[b], home[i], busy[b], start[b], offsets[b], reset[b] = i, b, i, new[i], 0, True
            timings.glue_s += time.perf_counter() - t0
            if (busy < 0).all():  # nothing to decode: every live trajectory waits on its environment
                if not waiting:
                    break
                t0 = time.perf_counter()
                self.pool.wait(list(waiting.values()))
                timings.env_s += time.perf_counter() - t0
                continue
            t0 = time.perf_counter()
            rows = np.maximum(busy, 0)
            keys = reply_keys(key, jnp.asarray([records[i].num_steps for i in rows]),
                              jnp.asarray(self.sampler.first_row + rows))
            out = self.sampler.decode([None if busy[b] < 0 else (start[b] if offsets[b] == 0 else [])
                                       for b in range(B)], self.codec.stop_ids, keys, offsets, reset, K)
            timings.sampler_s += time.perf_counter() - t0
            timings.count_call(out)
            t0 = time.perf_counter()
            for b in np.flatnonzero(busy >= 0):
                if offsets[b] == 0:
                    versions[b] = out.version  # a reply spanning a weight swap: its oldest version
                replies[b][0].extend(out.tokens[b])
                replies[b][1].extend(out.logprobs[b])
                offsets[b] += len(out.tokens[b])
                reset[b] = False
                if out.stopped[b] or offsets[b] >= self.sampler.max_new_tokens:
                    i = busy[b]
                    action = self._act(records[i], *replies[b], int(versions[b]))
                    closed[i], busy[b], replies[b] = out.stopped[b], -1, ([], [])
                    waiting[i] = self.pool.submit(lambda env=envs[i], a=action: env.step(a))
            timings.glue_s += time.perf_counter() - t0
        self._finish(records, opening)
        return records

    @staticmethod
    def _free_slot(owner: np.ndarray, busy: np.ndarray, records: list[TrajectoryRecord]) -> int | None:
        """A slot for a new trajectory: an empty one, else one whose trajectory has ended."""
        free = [b for b in np.flatnonzero(busy < 0) if owner[b] < 0 or not records[owner[b]].live]
        return int(free[0]) if free else None
