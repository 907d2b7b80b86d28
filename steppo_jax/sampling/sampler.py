"""Host-side sampler for the rollout loop: B conversations, one agent step per call."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from steppo_jax.sampling.generate import Generation, init_state, jit_generate
from steppo_jax.sampling.select import SamplingParams
from steppo_jax.sampling.slots import jit_decode_slots, jit_prefill_slots
from steppo_jax.sharding import batch_shards


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def prefill_width(n: int, chunk: int, longest: int) -> int:
    """Tokens a call prefills for ``n`` (the longest row's new tokens + its pending token): a
    power of two up to ``chunk`` (at most ``chunk``); above it, ``longest`` (the most a call
    can prefill) rounded up to a multiple of ``chunk``: prefilled a chunk at a time, only the
    chunks the rows need running, so every long prompt shares one program."""
    return min(bucket(n), chunk) if n <= chunk else -(-longest // chunk) * chunk


@dataclasses.dataclass(frozen=True)
class SlotShapes:
    """The shapes of the slot engine's sampler calls (`Sampler.decode`), so that its programs
    can be listed ahead of running them (`Sampler.warm_up`, `steppo plan`).

    A decode runs a call's busy slots rounded up to a multiple of ``width_step`` (at most
    ``decode_rows``) and attends over a span (a power of two >= 128, at most ``capacity``); a
    prefill runs its starting slots rounded up to a power of two (at most ``batch_size``) at a
    prefill width (`prefill_width`). A call on fewer rows than the cache reads and writes its
    rows of the cache in place, a layer at a time (`Decoder.extend(..., rows=)`); with the
    batch sharded over several devices (``shards`` > 1) such a gather would move each layer's
    rows between devices for every token, so there (``whole``) every call runs every row."""

    batch_size: int
    decode_rows: int
    width_step: int
    capacity: int
    max_new_tokens: int
    prefill_chunk: int
    whole: bool = False

    @classmethod
    def create(cls, *, batch_size: int, decode_rows: int, decode_widths: int, shards: int, capacity: int,
               max_new_tokens: int, prefill_chunk: int) -> SlotShapes:
        """Decode widths: multiples of ``decode_rows / decode_widths`` (one width, every row,
        when the batch is sharded: then ``decode_rows`` must be ``batch_size``)."""
        if shards > 1 and decode_rows != batch_size:
            raise ValueError(f"decode_rows={decode_rows} below the {batch_size} slots needs the sampler's batch on one "
                             f"device (here it is split over {shards}): a call gathers its rows out of the cache")
        step = decode_rows if shards > 1 else max(1, decode_rows // decode_widths)
        return cls(batch_size, decode_rows, step, capacity, max_new_tokens, prefill_chunk, whole=shards > 1)

    def decode_width(self, busy: int) -> int:
        """Rows a decode call runs for ``busy`` slots. So a call with few busy slots (slots
        waiting on their environments, the end of a collect) decodes few rows."""
        return min(self.decode_rows, -(-busy // self.width_step) * self.width_step)

    def prefill_rows(self, starting: int) -> int:
        """Rows a prefill call runs for ``starting`` slots."""
        return self.batch_size if self.whole else min(bucket(starting, 1), self.batch_size)

    def prefill_width(self, n: int) -> int:
        """The width of a call prefilling ``n`` tokens (`prefill_width`; the most a call can
        prefill: a whole reply's room left, plus the pending token)."""
        return prefill_width(n, self.prefill_chunk, self.capacity - self.max_new_tokens + 1)

    def span(self, reach: int) -> int:
        """The cache prefix a decode reaching position ``reach`` attends over."""
        return min(self.capacity, bucket(reach, 128))

    def decode_programs(self) -> list[tuple[int, int]]:
        """Every (rows, span) a decode can run."""
        widths = sorted({self.decode_width(n) for n in range(1, self.decode_rows + 1)})
        spans = sorted({self.span(n) for n in range(1, self.capacity + 1)})
        return [(w, s) for s in spans for w in widths]

    def prefill_programs(self) -> list[tuple[int, int]]:
        """Every (rows, width) a prefill can run (width: new tokens + the pending one)."""
        sizes = sorted({self.prefill_rows(n) for n in range(1, self.decode_rows + 1)})
        widths = sorted({self.prefill_width(n + 1) for n in range(self.capacity - self.max_new_tokens + 1)})
        return [(r, w) for r in sizes for w in widths]


@jax.jit
def _row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """One key per global row index: rows [B] -> keys [B]."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, rows)


@jax.jit
def reply_keys(key: jax.Array, steps: jax.Array, rows: jax.Array) -> jax.Array:
    """The key of step steps[b] of global row rows[b] of a rollout keyed ``key`` [B]: the key
    `Sampler.step(..., fold_in(key, step))` gives that row, for `Sampler.decode`."""
    return jax.vmap(lambda k, r: jax.random.fold_in(jax.random.fold_in(key, k), r))(steps, rows)


def _device(x) -> jax.Array:
    """A host array on the device as bool or int32, cast on the host."""
    x = np.asarray(x)
    return jnp.asarray(x if x.dtype == bool else x.astype(np.int32))


class StepOutput(NamedTuple):
    """Per row: generated ids and their behaviour log-probs (empty for inactive rows);
    `stopped[b]` is True when the step ended on one of the row's stop tokens; `version`: the
    policy version of the weights that drew them (`Sampler.set_params`)."""

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    stopped: np.ndarray
    version: int = 0
    rows: int = 0
    """Rows the call's decode ran (`step`: B; `decode`: its busy rows, rounded up)."""
    slot_steps: int = 0
    """Row-steps the call's sampling ran, padding rows included: B x the longest row's tokens
    for `step`; for `decode`, each prefill's rows (one token each) plus the decode's rows x
    its iterations. Tokens drawn / slot_steps is the call's slot utilisation."""


class Sampler:
    """Keeps B rows' KV caches across agent steps.

    `step(new_tokens, stop_ids, key)`: row b gets `new_tokens[b]` appended (prompt on the first
    turn, observation tokens later; None = row inactive this call, left untouched) and decodes
    one step. `reset=True` (or `reset=[...]` per row) starts new conversations. New-token widths
    are bucketed to powers of two up to `prefill_chunk`; longer prompts share one width (the
    most a call can prefill) and are prefilled `prefill_chunk` tokens at a time, as many
    chunks as the longest row needs (activations stay [B, prefill_chunk, ...] for any prompt
    length); attention reads only the cache prefix the call can reach
    (also a power-of-two bucket), so repeated turns reuse one compiled program per bucket pair.
    The cache holds `capacity` tokens per row; each row's total (all turns, prompt, observations
    and generated tokens) must stay within it, which `step` checks before running.

    Log-probs are those of the distribution each token was drawn from (temperature, then
    top-k/top-p truncation, renormalised: see `SamplingParams`); without top-k/top-p they equal
    `steppo_jax.models.token_logprobs` of the trainer's forward on the same tokens.
    `set_params` swaps in new weights without recompiling.

    `decode` serves the slot engine (`steppo_jax.rollout.SlotEngine`): each row is a slot,
    each call draws at most `chunk` tokens of every active slot's reply, with the slot's own
    reply key, so a reply cut into chunks is the one `step` draws; only the slots starting a
    reply are prefilled (`steppo_jax.sampling.slots`), and only the busy slots decode (their
    count rounded up to a multiple of `decode_rows / decode_widths`, `StepOutput.rows`: at most
    `decode_widths` compiled widths); a call ends early once that many of its rows have
    finished, so the caller can refill them or run fewer rows (`warm_up` compiles every shape a
    call can take). With `decode_rows` < `batch_size` the cache holds more conversations than a
    call decodes. A call on fewer rows than the cache reads and writes its rows of the cache
    in place, a layer at a time (a decode costs its busy rows, whatever the cache holds, and
    copies no cache); on a mesh that splits the batch over devices every call runs every row
    instead (`SlotShapes`), and `decode_rows` must be `batch_size`.

    Row b samples with the key `fold_in(key, first_row + b)`: a sampler holding rows
    [first_row, first_row + B) of a larger batch (one process's share) draws exactly what one
    sampler holding the whole batch would draw for those rows.
    """

    def __init__(self, model, *, batch_size: int, capacity: int, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), max_stop_ids: int = 8,
                 mesh: jax.sharding.Mesh | None = None, first_row: int = 0, prefill_chunk: int = 1024,
                 decode_rows: int | None = None, decode_widths: int = 16):
        if decode_rows is not None and not 1 <= decode_rows <= batch_size:
            raise ValueError(f"decode_rows={decode_rows} must be in [1, batch_size={batch_size}]")
        if decode_widths < 1:
            raise ValueError(f"decode_widths={decode_widths} must be >= 1")
        self.decode_rows = batch_size if decode_rows is None else decode_rows
        self.graphdef, params = nnx.split(model)
        self._weights = (params, 0)  # (params, policy version): swapped together, read together
        self.prefill_chunk = prefill_chunk
        self.batch_size, self.capacity, self.first_row = batch_size, capacity, first_row
        self.max_new_tokens, self.sampling, self.max_stop_ids = max_new_tokens, sampling, max_stop_ids
        self.mesh, self.config = mesh, model.config
        self.shapes = SlotShapes.create(batch_size=batch_size, decode_rows=self.decode_rows,
                                        decode_widths=decode_widths, shards=batch_shards(mesh), capacity=capacity,
                                        max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk)
        self.state = None  # the KV cache, allocated by the first step
        self._lengths = np.zeros(batch_size, np.int64)  # host mirror: cached + pending tokens

    def _allocate(self) -> None:
        with self._mesh_ctx():
            self.state = jax.jit(init_state, static_argnums=(0, 1, 2))(self.config, self.batch_size, self.capacity)
        self._lengths[:] = 0

    @property
    def params(self) -> nnx.State | None:
        return self._weights[0]

    @property
    def version(self) -> int:
        """The policy version of the current weights (0 for the model's own)."""
        return self._weights[1]

    def release(self) -> None:
        """Frees the KV cache and the weights (e.g. while the trainer updates the policy); the
        next `step` needs `set_params` first and starts every row anew."""
        self.state, self._weights = None, (None, self.version)

    def _mesh_ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def set_params(self, params: nnx.State, version: int | None = None) -> None:
        """Swap in new policy weights (same structure), e.g. after a training step; ``version``
        (default: unchanged) tags what they draw (`StepOutput.version`). Safe while another
        thread samples: a call uses the weights and version it started with."""
        self._weights = (params, self.version if version is None else version)

    def step(self, new_tokens: Sequence[Sequence[int] | None], stop_ids, key: jax.Array,
             reset: bool | Sequence[bool] = False) -> StepOutput:
        """new_tokens: B lists of ids (None: inactive row); stop_ids: one id list shared by all
        rows, or one list per row; key: PRNG key of the whole batch (see the class). Returns `StepOutput` (row b's tokens end on a
        stop id when stopped[b], else after max_new_tokens)."""
        b = self.batch_size
        params, version = self._weights
        if params is None:
            raise ValueError("the sampler was released: set_params before the next step")
        if self.state is None:
            self._allocate()
            reset = True
        if len(new_tokens) != b:
            raise ValueError(f"expected {b} rows of new tokens, got {len(new_tokens)}")
        reset_rows = np.broadcast_to(np.asarray(reset, bool), (b,)).copy()
        active = np.array([t is not None for t in new_tokens])
        lens = np.array([len(t) if t is not None else 0 for t in new_tokens])
        lengths = np.where(reset_rows, 0, self._lengths)
        self._check_room(np.flatnonzero(active), lengths, lens)
        # attend only over the cache prefix this call can reach (power-of-two buckets, >= 128)
        reach = int(np.max(np.where(active, lengths + lens + 1 + self.max_new_tokens, 1)))
        span = self.shapes.span(reach)
        # width + 1 (with the pending token generate prepends) is a power of two or a multiple
        # of the prefill chunk
        tok = np.zeros((b, self.shapes.prefill_width(int(lens.max(initial=0)) + 1) - 1), np.int32)
        for r in np.flatnonzero(active):
            tok[r, :lens[r]] = new_tokens[r]
        stops = self._stop_array(stop_ids)

        with self._mesh_ctx():
            keys = _row_keys(key, jnp.arange(self.first_row, self.first_row + b))
            self.state, out = jit_generate(
                self.graphdef, params, self.state, jnp.asarray(tok), jnp.asarray(lens, jnp.int32),
                jnp.asarray(active), jnp.asarray(reset_rows), jnp.asarray(stops), keys,
                max_new_tokens=self.max_new_tokens, sampling=self.sampling, span=span,
                prefill_chunk=self.prefill_chunk)
        tokens, logprobs, n, stopped = jax.device_get(tuple(out))
        self._lengths = np.where(active, lengths + lens + n, lengths)
        return StepOutput(
            tokens=[tokens[r, :n[r]].tolist() for r in range(b)],
            logprobs=[logprobs[r, :n[r]] for r in range(b)],
            stopped=np.asarray(stopped),
            version=version,
            rows=b,
            slot_steps=b * int(n.max(initial=0)),
        )

    def decode(self, new_tokens: Sequence[Sequence[int] | None], stop_ids, keys: jax.Array,
               offsets: Sequence[int], reset: Sequence[bool], chunk: int) -> StepOutput:
        """At most ``chunk`` tokens of each active row's reply (the slot engine's call).

        A row starting a reply (offsets[b] == 0) appends new_tokens[b] as in `step`, prefilled
        with the other starting rows only (`sampling.slots.prefill_slots`); a row continuing
        one passes [] and the tokens its reply holds so far as offsets[b]. keys [B]: each
        row's reply key (`reply_keys`); a reply is the one `step` draws with that key, however
        it is cut into chunks. stopped[b]: the reply ended on a stop token; it is also over
        when offsets[b] + len(tokens[b]) reaches max_new_tokens.
        """
        b = self.batch_size
        if not 1 <= chunk <= self.max_new_tokens:
            raise ValueError(f"chunk={chunk} must be in [1, max_new_tokens={self.max_new_tokens}]")
        params, version = self._weights
        if params is None:
            raise ValueError("the sampler was released: set_params before the next step")
        if self.state is None:
            self._allocate()
            reset = [True] * b
        if len(new_tokens) != b:
            raise ValueError(f"expected {b} rows of new tokens, got {len(new_tokens)}")
        offsets = np.asarray(offsets, np.int32)
        active = np.array([t is not None for t in new_tokens])
        if active.sum() > self.decode_rows:
            raise ValueError(f"{active.sum()} active rows, but a call decodes at most decode_rows={self.decode_rows}")
        starting = active & (offsets == 0)
        lens = np.array([len(t) if t is not None else 0 for t in new_tokens])
        lengths = np.where(starting & np.asarray(reset, bool), 0, self._lengths)
        self._check_room(np.flatnonzero(starting), lengths, lens)
        stops = self._stop_array(stop_ids)  # host: each call sends its rows' ids
        tokens, logprobs = [[] for _ in range(b)], [np.zeros(0, np.float32) for _ in range(b)]
        stopped = np.zeros(b, bool)
        slot_steps, ran = 0, 0  # ran: the decode's rows
        with self._mesh_ctx():
            widths = {r: self.shapes.prefill_width(int(lens[r]) + 1) for r in np.flatnonzero(starting)}
            for width in sorted(set(widths.values())):  # one prefill per width: short ones pad little
                first = np.array([r for r, w in widths.items() if w == width])
                rows = self._call_rows(first, self.shapes.prefill_rows(first.size))
                size = rows.size
                at = {r: p for p, r in enumerate(rows)}
                tok = np.zeros((size, width - 1), np.int32)
                for r in first:
                    tok[at[r], :lens[r]] = new_tokens[r]
                out = self._prefill(params, rows, np.isin(rows, first), tok, lens[rows],
                                    np.asarray(reset, bool)[rows], stops[rows], keys[rows])
                tok0, lp0, _, stop0 = jax.device_get(tuple(out))
                slot_steps += size
                for r in first:
                    p = at[r]
                    tokens[r], logprobs[r], stopped[r] = [int(tok0[p, 0])], lp0[p, :1], bool(stop0[p])
            drawn = np.array([len(t) for t in tokens])
            budget = np.where(active & ~stopped, np.minimum(chunk, self.max_new_tokens - offsets) - drawn, 0)
            if budget.max() > 0:
                reach = int(np.max(np.where(budget > 0, lengths + lens + drawn + budget, 1)))
                busy = np.flatnonzero(budget > 0)
                rows = self._call_rows(busy, self.shapes.decode_width(busy.size))
                ran = rows.size
                out = self._decode(params, rows, budget[rows], stops, keys, offsets[rows] + drawn[rows], chunk,
                                   span=self.shapes.span(reach))
                more, lp, n, stop = jax.device_get(tuple(out))
                slot_steps += ran * int(n.max())
                for p, r in enumerate(rows):
                    if budget[r] > 0:
                        tokens[r] = tokens[r] + more[p, :n[p]].tolist()
                        logprobs[r] = np.concatenate([logprobs[r], lp[p, :n[p]]])
                        stopped[r] = bool(stop[p])
        self._lengths = np.where(active, lengths + lens + np.array([len(t) for t in tokens]), self._lengths)
        return StepOutput(tokens=tokens, logprobs=logprobs, stopped=stopped, version=version, rows=ran,
                          slot_steps=slot_steps)

    def _call_rows(self, chosen: np.ndarray, size: int) -> np.ndarray:
        """The ``size`` distinct cache rows of a call on the ``chosen`` rows: every row in
        order when ``size`` is the batch (the call gathers nothing), else the chosen ones first,
        then others as padding."""
        b = self.batch_size
        return np.arange(b) if size == b else np.concatenate([chosen, np.setdiff1d(np.arange(b), chosen)])[:size]

    def _prefill(self, params, rows, starting, tok, lens, reset, stops, keys) -> Generation:
        """One `prefill_slots` call on the distinct cache rows ``rows`` [P] (host arrays, stops
        [P, S] too; keys: the device keys of those rows). Its attention reads the whole cache: a call
        prefills few rows, and the programs stay few (no span bucket)."""
        # host arrays are cast on the host: a cast on the device under a mesh commits its
        # output, and a committed argument would compile a program of its own
        whole = rows.size == self.batch_size  # all rows in order: no gather
        self.state, out = jit_prefill_slots(
            self.graphdef, params, self.state, None if whole else _device(rows),
            *map(_device, (starting, tok, lens, reset, stops)), keys,
            sampling=self.sampling, prefill_chunk=self.prefill_chunk)
        return out

    def _decode(self, params, rows, budget, stops, keys, offsets, chunk: int, span: int) -> Generation:
        """One `decode_slots` call on the distinct cache rows ``rows`` [W] (all B in order: slot
        p is row p, no gather), each drawing at most budget [W] tokens; stops [B, S] (host) and
        keys [B] (device) of every row."""
        gather = None if rows.size == self.batch_size else _device(rows)
        self.state, out = jit_decode_slots(
            self.graphdef, params, self.state, _device(budget > 0), _device(stops[rows]),
            keys if gather is None else keys[rows], _device(offsets), _device(budget), gather,
            _device(max(rows.size - self.shapes.width_step, 0)), chunk=chunk, sampling=self.sampling, span=span)
        return out

    def warm_up(self, chunk: int) -> int:
        """Compiles every program `decode` with ``chunk`` can run (`SlotShapes`), by running
        each shape once with no row busy. A later `decode` compiles nothing, so a measurement
        (or a run's first iterations) sees steady-state calls only. Returns the number of
        programs run; the cache keeps its contents."""
        params = self._weights[0]
        if params is None:
            raise ValueError("the sampler was released: set_params before warm_up")
        if self.state is None:
            self._allocate()
        stops = np.full((self.batch_size, self.max_stop_ids), -1, np.int32)
        keys = reply_keys(jax.random.key(0), jnp.zeros(self.batch_size, jnp.int32), jnp.arange(self.batch_size))
        decodes, prefills = self.shapes.decode_programs(), self.shapes.prefill_programs()
        with self._mesh_ctx():
            for width, span in decodes:
                rows, zero = np.arange(width), np.zeros(width, np.int32)
                jax.block_until_ready(self._decode(params, rows, zero, stops, keys, zero, chunk, span))
            for size, width in prefills:
                rows, none = np.arange(size), np.zeros(size, bool)
                jax.block_until_ready(self._prefill(params, rows, none, np.zeros((size, width - 1), np.int32),
                                                    np.zeros(size), none, stops[rows], keys[rows]))
        return len(decodes) + len(prefills)

    def _check_room(self, rows, lengths: np.ndarray, lens: np.ndarray) -> None:
        """Each of ``rows`` has context to decode from and room for a whole reply."""
        for r in rows:
            if lengths[r] + lens[r] == 0:
                raise ValueError(f"row {r} is active but has no context to decode from")
            if lengths[r] + lens[r] + self.max_new_tokens > self.capacity:
                raise ValueError(f"row {r}: {lengths[r]} cached + {lens[r]} new + max_new_tokens="
                                 f"{self.max_new_tokens} exceeds the cache capacity {self.capacity}")

    def _stop_array(self, stop_ids) -> np.ndarray:
        stop_ids = list(stop_ids)
        nested = len(stop_ids) > 0 and not np.isscalar(stop_ids[0])
        per_row = [list(ids) for ids in stop_ids] if nested else [stop_ids] * self.batch_size
        if len(per_row) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} per-row stop id lists, got {len(per_row)}")
        out = np.full((self.batch_size, self.max_stop_ids), -1, np.int32)
        for r, ids in enumerate(per_row):
            if len(ids) > self.max_stop_ids:
                raise ValueError(f"row {r} has {len(ids)} stop ids > max_stop_ids={self.max_stop_ids}")
            out[r, :len(ids)] = ids
        return out
