"""What every job of a run needs on the host: meshes, tokenizer, environments, rollout engines.

Two meshes: ``mesh`` holds the train state and runs the scoring passes and updates (it spans
every process's devices); ``sample_mesh`` runs this process's sampler (its local devices),
so the rollout loop of each process stays on its own host. In one process they are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from steppo_jax import envs, sharding
from steppo_jax.rollout import (RolloutEngine, RolloutSettings, SlotEngine, TrajectoryRecord, bucket_len,
                               packed_batch, step_rows_batch)
from steppo_jax.sampling import Sampler, SamplingParams, SlotShapes
from steppo_jax.tokenizer import load_tokenizer
from steppo_jax.train.config import Config, ConfigError
from steppo_jax.train.state import make_mesh
from steppo_jax.train.tasks import task_split
from steppo_jax.types import StepBatch


def local_mesh(mesh: jax.sharding.Mesh, devices: Sequence[Any] | None = None, process: int | None = None
               ) -> jax.sharding.Mesh:
    """This process's share of a mesh spanning several processes: its local devices with the
    same axes, the tensor axis kept and as much of the fsdp axis as fits (the rest is data).

    devices: every device of the run (default ``jax.devices()``); process: this process's index
    (default ``jax.process_index()``). ``steppo plan`` passes a TPU topology's devices and 0."""
    devices = jax.devices() if devices is None else list(devices)
    process = jax.process_index() if process is None else process
    local = [d for d in devices if d.process_index == process]
    if mesh.devices.size != len(devices):
        processes = len({d.process_index for d in devices})
        raise ConfigError(f"with {processes} processes the mesh must use all {len(devices)} "
                          f"devices, not {mesh.devices.size} (set mesh.data=-1)")
    n, t = len(local), mesh.shape["tensor"]
    if n % t:
        raise ConfigError(f"mesh.tensor={t} must divide the {n} devices of each process")
    f = math.gcd(mesh.shape["fsdp"], n // t)
    explicit = all(a == AxisType.Explicit for a in mesh.axis_types)
    return sharding.make_mesh(n // (f * t), f, t, explicit=explicit, devices=local)


def _check_process_rows(mesh: jax.sharding.Mesh) -> None:
    """Process p's devices must hold rows [p * n, (p + 1) * n) of a batch over (data, fsdp):
    each process puts the rows of its own trajectories there."""
    shards = sharding.batch_shards(mesh)
    where = NamedSharding(mesh, P(("data", "fsdp"))).addressable_devices_indices_map((shards,))
    rows = {index[0].start or 0 for index in where.values()}
    n, p = shards // jax.process_count(), jax.process_index()
    if rows != set(range(p * n, (p + 1) * n)):
        raise ConfigError(f"process {p} holds batch shards {sorted(rows)} of the mesh, not a contiguous block: "
                          "this device order cannot split the batch by process")


def _to_local(x: jax.Array, target) -> jax.Array:
    """Global array ``x``, of which this process's devices hold every index ``target`` (a
    NamedSharding on the local mesh) needs, as an array with ``target``."""
    held = {}
    for shard in x.addressable_shards:
        held.setdefault(tuple((s.start, s.stop) for s in shard.index), shard.data)
    pieces = [jax.device_put(held[tuple((s.start, s.stop) for s in idx)], device)
              for device, idx in target.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, target, pieces)


def slot_shapes(r, trajectories: int, mesh) -> SlotShapes:
    """The slot engine's sampler shapes for ``trajectories`` rows on ``mesh``: ``rollout.slots``
    slots decoded ``rollout.decode_rows`` at a time (0: one slot per trajectory, every slot
    decoded), each at most ``trajectories`` and rounded up to a multiple of the mesh's batch
    shards. A ConfigError when the mesh cannot decode fewer rows than its slots."""
    shards = sharding.batch_shards(mesh)
    fit = lambda n: -(-min(n, trajectories) // shards) * shards  # noqa: E731
    slots = fit(r.slots) if r.slots else trajectories
    try:
        return SlotShapes.create(batch_size=slots, decode_rows=fit(r.decode_rows) if r.decode_rows else slots,
                                 decode_widths=r.decode_widths, shards=shards, capacity=r.max_context,
                                 max_new_tokens=r.max_new_tokens, prefill_chunk=r.prefill_chunk)
    except ValueError as err:
        raise ConfigError(f"rollout.decode_rows: {err}") from None


@dataclasses.dataclass
class Runtime:
    cfg: Config
    mesh: jax.sharding.Mesh
    sample_mesh: jax.sharding.Mesh
    tokenizer: Any
    pool: envs.EnvPool

    @classmethod
    def create(cls, cfg: Config) -> "Runtime":
        mesh = make_mesh(cfg)
        sample_mesh = mesh
        if jax.process_count() > 1:
            sample_mesh = local_mesh(mesh)
            _check_process_rows(mesh)
        # with worker processes the pool's threads only wait on them: a few per process
        threads = cfg.env.workers * (4 if cfg.env.pool == "process" else 1)
        return cls(cfg, mesh, sample_mesh, load_tokenizer(cfg.model.tokenizer_path),
                   envs.EnvPool(num_workers=threads, timeout_s=cfg.env.step_timeout_s))

    def env_factory(self) -> Callable[[], envs.Environment]:
        """Builds the configured environment (in this process); rollout limits apply unless
        options override them. Picklable, for ``rollout_envs``' worker processes."""
        e = self.cfg.env
        options = {"max_steps": e.max_steps, "max_invalid_calls": e.max_invalid_calls, **e.options}
        try:  # fail early, naming the config field, on a bad name or option
            envs.make(e.name, **options)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"env.name / env.options: {err.args[0] if err.args else err}") from None
        return functools.partial(envs.resolve(e.name), **options)

    @functools.cached_property
    def rollout_envs(self) -> Callable[[], envs.Environment]:
        """What the rollout engines build environments with: ``env_factory``, or with
        ``env.pool: process`` proxies of environments built in ``env.workers`` processes
        (started on first use)."""
        if self.cfg.env.pool == "process":
            return envs.ProcessEnvs(self.env_factory(), self.cfg.env.workers).make
        return self.env_factory()

    @functools.cached_property
    def task_split(self) -> envs.TaskSplit:
        """The run's training and held-out task ids (``train.tasks.task_split``), found once:
        the trainer, its evaluator and SFT draw from the same split."""
        return task_split(self.cfg.env, self.env_factory()())

    def settings(self) -> RolloutSettings:
        r = self.cfg.rollout
        return RolloutSettings(max_steps=self.cfg.env.max_steps, max_context=r.max_context,
                               history_window=r.history_window)

    def sampler(self, model, batch_size: int, *, greedy: bool = False, first_row: int = 0) -> Sampler:
        """A sampler on ``sample_mesh`` for rows [first_row, first_row + batch_size) of a batch:
        that many rows, or for the slot engine ``rollout.slots`` slots decoded
        ``rollout.decode_rows`` at a time (each rounded up to a multiple of the sample mesh's
        batch shards)."""
        r = self.cfg.rollout
        sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, greedy=greedy)
        decode_rows = None
        if r.engine == "slots":
            shapes = slot_shapes(r, batch_size, self.sample_mesh)
            batch_size, decode_rows = shapes.batch_size, shapes.decode_rows
        return Sampler(model, batch_size=batch_size, capacity=r.max_context, max_new_tokens=r.max_new_tokens,
                       sampling=sampling, mesh=self.sample_mesh, first_row=first_row,
                       prefill_chunk=r.prefill_chunk, decode_rows=decode_rows, decode_widths=r.decode_widths)

    def to_sample_mesh(self, params):
        """The sampler's copy of policy ``params`` (train mesh): in the compute dtype, laid out
        for decoding (``sharding.DECODE_RULES``: whole over data and fsdp, split over tensor) on
        ``sample_mesh``. Made once per policy update, so decoding never gathers FSDP shards.

        Across processes the copy is first laid out on the train mesh in the decode layout,
        where every process's devices hold all of it (tensor stays within a process); each
        local device then takes its shard from a local device that holds it. No device ever
        holds more than its decode shard.
        """
        dtype = self.cfg.model.compute_dtype
        cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        decode = sharding.state_shardings(params, self.mesh, sharding.DECODE_RULES)
        with jax.set_mesh(self.mesh):
            on_train = jax.jit(lambda t: jax.tree.map(cast, t), out_shardings=decode)(params)
        if self.sample_mesh is self.mesh:
            return on_train
        local = sharding.state_shardings(params, self.sample_mesh, sharding.DECODE_RULES)
        return jax.tree.map(_to_local, on_train, local)

    def engine(self, sampler, make_env=None, *, synchronous: bool = False) -> RolloutEngine:
        """The configured engine (``rollout.engine``) around ``sampler``; ``synchronous``: the
        step-synchronous one whatever the config (a scripted sampler has no ``decode``)."""
        make_env = make_env or self.rollout_envs
        if self.cfg.rollout.engine == "slots" and not synchronous:
            return SlotEngine(make_env, self.tokenizer, sampler, self.settings(), self.pool,
                              chunk=self.cfg.rollout.decode_chunk)
        return RolloutEngine(make_env, self.tokenizer, sampler, self.settings(), self.pool)

    def layout(self, records: list[TrajectoryRecord], *, seq_len: int | None = None, num_rows: int | None = None,
               num_slots: int | None = None) -> StepBatch:
        """The configured layout of this process's records (numpy arrays).

        T = ``seq_len`` or ``self.seq_len(records)``; the rows (and, for per-step rows, the
        slots per row) are ``num_rows`` / ``num_slots`` when given, else the fewest that hold
        the records, rows rounded up to ``self.row_multiple()``.
        """
        r, steps = self.cfg.rollout, self.cfg.env.max_steps
        seq_len = seq_len or self.seq_len(records)
        if r.layout == "packed":
            return packed_batch(records, steps, seq_len, num_rows=num_rows, row_multiple=self.row_multiple())
        return step_rows_batch(records, steps, pack=r.pack_step_rows, seq_len=seq_len, num_rows=num_rows,
                               num_slots=num_slots, row_multiple=self.row_multiple())

    def seq_len(self, records: list[TrajectoryRecord]) -> int:
        """T of the layout of ``records``: its longest row (a trajectory, or a step row or a
        final state), bucketed (``bucket_len``) and capped at ``rollout.max_context``."""
        if self.cfg.rollout.layout == "packed":
            longest = max((len(r.tokens) for r in records), default=1)
        else:
            steps = [r.step_row_len(k) for r in records if r.failed is None for k in range(r.num_steps)]
            finals = [len(ids) for r in records if (ids := r.final_row()) is not None]
            longest = max(steps + finals, default=1)
        return bucket_len(longest, maximum=self.cfg.rollout.max_context)

    def row_multiple(self) -> int:
        """This process's rows must be a multiple of this: every minibatch (and micro-batch,
        with ``optim.micro_batch_rows``) then splits evenly over the (data, fsdp)
        shards. Rows beyond the records' are padding, so no more are added than that."""
        o = self.cfg.optim
        shards = sharding.batch_shards(self.mesh)
        per_minibatch = math.lcm(shards, o.micro_batch_rows or 1)
        return o.minibatches * per_minibatch // jax.process_count()

    def batch_sharding(self) -> NamedSharding:
        """Rows over (data, fsdp); everything else replicated."""
        return NamedSharding(self.mesh, P(("data", "fsdp")))

    def put(self, tree):
        """Places a host pytree of row-major arrays with ``batch_sharding`` (every process
        passes the whole batch)."""
        sharding = self.batch_sharding()
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)

    def put_local(self, tree):
        """Global arrays [P * n, ...] with ``batch_sharding`` from each process's own rows
        [n, ...] (process p's rows come p-th)."""
        sharding = self.batch_sharding()
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
