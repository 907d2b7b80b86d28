"""``steppo plan``: does this config fit this topology? Answered before renting it.

Everything is built abstractly (``jax.ShapeDtypeStruct`` leaves with ``NamedSharding``s on a
mesh of a TPU topology's devices, or of host CPU devices): the models from the config (an HF
model from its ``config.json`` alone), the train state through the optimizer's own ``init``,
and the batches at their largest padded shapes. Then the programs the trainer jits are compiled
ahead of time for that topology, and each one's per-device memory is read from the compiler:

- ``score``: ``update.score``, the scoring pass over all rows of an iteration;
- ``update``: ``make_update``, one optimizer step on one minibatch (donating the train state);
- ``prefill``: ``jit_generate`` with the widest prompt the sampler can send
  (``rollout.max_context - rollout.max_new_tokens`` new tokens), then its decode loop;
- ``decode``: ``jit_generate`` with the narrowest prompt bucket: the per-token decode loop.

With ``rollout.engine: slots`` the sampler entries are the slot engine's programs instead
(``sampling.slots``): ``prefill`` starts replies in the most slots a call can start at the
widest prompt, ``decode`` draws ``rollout.decode_chunk`` tokens in ``rollout.decode_rows``
rows, both over a cache of ``rollout.slots`` rows (``train.runtime.slot_shapes``); the shapes line gives how many programs such a sampler
can compile in all (``slot_programs``, each decode width x span and prefill rows x width:
what ``Sampler.warm_up`` compiles).

The sampler prefills and decodes in one program, so both sampler entries are real programs of a
run (a first turn with a long prompt, a later turn with a short observation); they differ in
their prefill width.

Per device: peak = argument + temp + output - alias bytes (donated arguments that become outputs
count once); resident = bytes that stay allocated while the program runs without being its
arguments (the train state and the reference while sampling, the optimizer state while scoring,
the reference while updating: the sampler's cache and weights are released before the passes);
the program fits when peak + resident <= the chip's HBM. Under asynchronous training
(``rollout.max_staleness`` >= 1, one process) the sampler runs beside the scoring pass and the
update: their resident bytes then include the largest sampler program's peak, and the sampler
programs' the larger of their peaks. FLOPs come from the model config, not
XLA's cost analysis (on a CPU-hosted TPU compile it counts loop bodies once and skips Pallas
kernels): 2 x matmul parameters x tokens plus causal attention 2 x L x H x hd x T^2 per
row forward, x 3 for forward + backward; the estimated time is FLOPs / (peak FLOP/s x MFU),
or, for the sampler's decode loop, the HBM traffic (weights + KV cache per token) / bandwidth
when that is larger.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from steppo_jax import sharding
from steppo_jax.rollout.records import bucket_len
from steppo_jax.sampling import SamplingParams, bucket, init_state as init_decode_state, jit_generate
from steppo_jax.sampling.sampler import prefill_width
from steppo_jax.sampling.slots import jit_decode_slots, jit_prefill_slots
from steppo_jax.train.config import Config, ConfigError
from steppo_jax.train.evaluate import eval_batch_size
from steppo_jax.train.runtime import local_mesh, slot_shapes
from steppo_jax.train.state import TrainState, abstract_models, make_mesh, make_optimizer
from steppo_jax.train.update import TrainBatch, make_update, score

GIB = 1 << 30
MFU = 0.4
"""Assumed model FLOP utilisation of the time estimates."""
PROGRAMS = ("score", "update", "prefill", "decode")


class PlanError(ValueError):
    """Bad input to the planner: an unknown topology, or no TPU compiler installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM bytes, peak bf16 FLOP/s and HBM bandwidth (bytes/s) per chip."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    cores_per_chip: int
    """TensorCores per chip: v4 and v5p names count cores (v5p-64 = 32 chips)."""
    chip_config: str
    """libtpu's chip configuration: v4 chips run as one megacore device each."""


CHIPS = {
    "v4": Chip(32 * GIB, 275e12, 1.2e12, 2, "megacore"),
    "v5p": Chip(95 * GIB, 459e12, 2.765e12, 2, "default"),
    "v5e": Chip(16 * GIB, 197e12, 8.19e11, 1, "default"),
    "v6e": Chip(32 * GIB, 918e12, 1.64e12, 1, "default"),
}
# chips -> physical shape: 3D tori (v4, v5p) and 2D ones (v5e, v6e)
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: ``family`` chips in ``shape``, ``host`` chips per host (x, y, z)."""

    name: str
    family: str
    shape: str
    host: tuple[int, int, int]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]


def _known() -> dict[str, Topology]:
    out = {}
    for family in ("v4", "v5p"):
        for chips, shape in _SHAPES_3D.items():
            out[f"{family}-{2 * chips}"] = Topology(f"{family}-{2 * chips}", family, shape, (2, 2, 1))
    for family in ("v5e", "v6e"):
        for chips, shape in _SHAPES_2D.items():
            host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))  # 8 chips: one host
            out[f"{family}-{chips}"] = Topology(f"{family}-{chips}", family, shape, host)
    return out


TOPOLOGIES = _known()


def topology(name: str) -> Topology:
    """The known topology ``name`` (also Cloud TPU's ``v5litepod-N``); PlanError lists them."""
    family, _, size = name.partition("-")
    key = f"{_ALIASES.get(family, family)}-{size}"
    if key not in TOPOLOGIES:
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[key]


def host_topology(topo: Topology) -> Topology:
    """One host of ``topo`` as a slice of its own: where each process's sampler programs are
    compiled (v5e and v6e compile no program for a subset of a slice's devices)."""
    dims = topo.host if topo.family in ("v4", "v5p") else topo.host[:2]
    return dataclasses.replace(topo, name=f"{topo.name} host", shape="x".join(map(str, dims)))


def topology_devices(topo: Topology) -> list:
    """The devices of ``topo`` for ahead-of-time compiles (libtpu, no TPU needed)."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("planning for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topo.family}:{topo.shape}",
                                        chip_config_name=topo.chip.chip_config, chips_per_host_bounds=topo.host,
                                        num_slices=1)
    return list(desc.devices)


# -- shapes -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shapes:
    """The largest padded shapes of a run: train rows x length and slots per row, minibatch
    rows, sampler rows per process (train and evaluation) and the prefill width; the
    sampler's cache rows and decode rows (the slot engine's slots and ``decode_rows``, else
    both ``sample_rows``), and the programs a slot sampler can compile (``SlotShapes``;
    ``Sampler.warm_up`` compiles them all; 0 for the synchronous engine)."""

    rows: int
    seq_len: int
    slots: int
    minibatch: int
    sample_rows: int
    eval_rows: int
    prefill_width: int
    cache_rows: int
    decode_rows: int
    slot_programs: int


def shapes(cfg: Config, processes: int, mesh, sample_mesh) -> Shapes:
    """The largest shapes the trainer pads to (``Runtime.layout``, ``Trainer._local_batch``):
    rows rounded up to the mesh's row multiple per process, then stacked over processes; the
    length bucket of ``rollout.max_context``. Per-step rows count one step per row (no packing:
    the most rows a batch can need), and one final-state row per trajectory (a trajectory cut
    after its last step bootstraps from one, ``step_rows_batch``)."""
    r, e, o = cfg.rollout, cfg.env, cfg.optim
    local_traj = r.tasks_per_iter // processes * r.group_size
    shards = sharding.batch_shards(mesh)
    multiple = max(o.minibatches * math.lcm(shards, o.micro_batch_rows or 1) // processes, 1)
    local_rows = local_traj if r.layout == "packed" else local_traj * (e.max_steps + 1)
    rows = -(-local_rows // multiple) * multiple * processes
    slots = e.max_steps if r.layout == "packed" else 1
    eval_share = -(-e.eval_tasks // processes)
    longest = r.max_context - r.max_new_tokens + 1  # the most tokens a sampler call prefills
    slot = slot_shapes(r, local_traj, sample_mesh) if r.engine == "slots" else None
    return Shapes(rows=rows, seq_len=bucket_len(r.max_context, maximum=r.max_context), slots=slots,
                  minibatch=rows // o.minibatches, sample_rows=local_traj,
                  eval_rows=eval_batch_size(eval_share, sample_mesh),
                  prefill_width=prefill_width(longest, r.prefill_chunk, longest) - 1,
                  cache_rows=slot.batch_size if slot else local_traj,
                  decode_rows=slot.decode_rows if slot else local_traj,
                  slot_programs=len(slot.decode_programs()) + len(slot.prefill_programs()) if slot else 0)


def check_batch(cfg: Config, mesh, processes: int) -> None:
    """The trainer's batch rules (``Trainer.__init__``) as ConfigErrors."""
    r, o = cfg.rollout, cfg.optim
    if r.tasks_per_iter % processes:
        raise ConfigError(f"rollout.tasks_per_iter={r.tasks_per_iter} must split evenly over the {processes} processes")
    n_dev = sharding.batch_shards(mesh)
    if (r.tasks_per_iter * r.group_size) % (o.minibatches * n_dev):
        raise ConfigError(f"rollout.tasks_per_iter x rollout.group_size = {r.tasks_per_iter * r.group_size} "
                          f"trajectories must split into optim.minibatches={o.minibatches} minibatches of a multiple "
                          f"of {n_dev} devices")


# -- FLOPs from the model config ----------------------------------------------------------------
def forward_flops(mc, tokens: int, attended: float, *, lm_head: bool = True) -> float:
    """FLOPs of a forward over ``tokens`` tokens: 2 x matmul parameters per token (the
    embedding lookup is free; the LM head counts when used) plus the attention scores and
    values, 4 x L x H x hd per (query, key) pair for ``attended`` pairs in all."""
    emb = mc.vocab_size * mc.d_model
    matmul = mc.num_params() - emb * (1 if mc.tie_embeddings else 2) + (emb if lm_head else 0)
    return 2.0 * matmul * tokens + 4.0 * mc.n_layers * mc.n_heads * mc.head_dim * attended


def _causal_pairs(rows: int, length: int) -> float:
    return rows * length * length / 2


def program_flops(cfg: Config, models, s: Shapes) -> dict[str, float]:
    """FLOPs of one call of each program, summed over its devices."""
    mc, r = models.config, cfg.rollout

    def passes(rows: int) -> float:
        tokens, pairs = rows * s.seq_len, _causal_pairs(rows, s.seq_len)
        total = forward_flops(mc, tokens, pairs)
        if models.critic == "separate":
            total += forward_flops(mc, tokens, pairs, lm_head=False)
        return total

    ref = forward_flops(mc, s.rows * s.seq_len, _causal_pairs(s.rows, s.seq_len)) if cfg.algo.kl_coef else 0.0
    # each decode step reads the whole cache span (rollout.max_context slots)
    loop = r.max_new_tokens * forward_flops(mc, s.sample_rows, s.sample_rows * r.max_context)

    def prefill(width: int) -> float:
        return forward_flops(mc, s.sample_rows * (width + 1), _causal_pairs(s.sample_rows, width + 1))

    return {"score": passes(s.rows) + ref, "update": 3 * passes(s.minibatch),
            "prefill": prefill(s.prefill_width) + loop, "decode": prefill(bucket(1) - 1) + loop}


# -- abstract arguments ---------------------------------------------------------------------------
def _sds(shape, dtype, mesh, spec=P()) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _opt_state(tx, params, mesh) -> Any:
    """``tx.init(params)`` as abstract arrays: moments sharded as their parameters (as ``jit``
    propagates them in ``init_state``; their Variables keep the logical axes), counters
    replicated; the other group's masked-out leaves (``optax.MaskedNode``) stay as they are."""
    def one(x):
        if isinstance(x, nnx.Variable):
            return sharding.abstract_state(x, mesh) if hasattr(x.get_value(), "shape") else x
        return _sds(x.shape, x.dtype, mesh)

    return jax.tree.map(one, jax.eval_shape(tx.init, params), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _decode_state(mc, rows: int, capacity: int, mesh) -> Any:
    """The sampler's ``DecodeState`` as abstract arrays, sharded as ``init_state`` constrains
    them (traced under Explicit axes, where shardings are part of the shapes)."""
    explicit = sharding.make_mesh(*mesh.devices.shape, devices=list(mesh.devices.flat))
    with jax.set_mesh(explicit):
        out = jax.eval_shape(lambda: init_decode_state(mc, rows, capacity))
    return jax.tree.map(lambda a: _sds(a.shape, a.dtype, mesh, a.sharding.spec), out)


def device_bytes(tree) -> int:
    """Bytes per device of an abstract tree (the largest shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Program:
    """One program to compile: the jitted function, its abstract arguments, the bytes that
    stay allocated beside them, its mesh and its FLOPs (all devices)."""

    fn: Any
    args: tuple
    kwargs: dict
    resident: int
    mesh: Any
    flops: float
    loop_bytes: int = 0
    """HBM bytes per device its decode loop reads (weights + cache, per token, all tokens)."""


def programs(cfg: Config, devices: Sequence[Any], vocab_size: int,
             host_devices: Sequence[Any] | None = None) -> tuple[dict[str, Program], Shapes]:
    """The four programs of a run on ``devices``, with abstract arguments; with several
    processes the sampler's run on process 0's share (on ``host_devices`` when given)."""
    processes = len({d.process_index for d in devices})
    if cfg.rollout.max_staleness and processes > 1:
        raise ConfigError(f"rollout.max_staleness={cfg.rollout.max_staleness} (asynchronous training) runs in one "
                          f"process, not {processes}")
    mesh = make_mesh(cfg, devices)
    check_batch(cfg, mesh, processes)
    sample_mesh = mesh if processes == 1 else local_mesh(mesh, devices, process=0)
    if processes > 1 and host_devices is not None:
        explicit = all(t == jax.sharding.AxisType.Explicit for t in sample_mesh.axis_types)
        sample_mesh = sharding.make_mesh(*sample_mesh.devices.shape, explicit=explicit, devices=host_devices)
    models, params = abstract_models(cfg, vocab_size, mesh)
    s = shapes(cfg, processes, mesh, sample_mesh)
    o, r = cfg.optim, cfg.rollout
    tx = make_optimizer(o, cfg.train.iterations * o.epochs * o.minibatches)
    opt_state = _opt_state(tx, params, mesh)
    state = TrainState(params=params, opt_state=opt_state, step=_sds((), jnp.int32, mesh))
    ref = params["policy"] if cfg.algo.kl_coef else None
    rows_spec = P(("data", "fsdp"))
    row = lambda dtype, width=s.seq_len: _sds((s.rows, width), dtype, mesh, rows_spec)  # noqa: E731
    batch = TrainBatch(tokens=row(jnp.int32), step_ids=row(jnp.int32), old_logp=row(jnp.float32),
                       ref_logp=row(jnp.float32), adv_bt=row(jnp.float32), returns_bt=row(jnp.float32),
                       old_values_bt=row(jnp.float32), value_pos=row(jnp.int32, s.slots),
                       slot_mask=row(jnp.bool_, s.slots), returns_bs=row(jnp.float32, s.slots),
                       behavior_weight_bs=row(jnp.float32, s.slots),
                       segment_ids=row(jnp.int32) if cfg.rollout.layout == "step_rows" else None)
    minibatch = _sds((s.minibatch,), jnp.int32, mesh)

    # the sampler's copy: compute dtype, decode layout (Runtime.to_sample_mesh)
    sample_params = sharding.abstract_state(params["policy"], sample_mesh, sharding.DECODE_RULES,
                                            jnp.dtype(cfg.model.compute_dtype))
    decode_state = _decode_state(models.config, s.sample_rows, r.max_context, sample_mesh)
    ref_bytes = device_bytes(ref) if ref is not None else 0
    flops = program_flops(cfg, models, s)

    b = s.sample_rows
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)

    def generate(width: int, name: str) -> Program:
        args = (models.policy_def, sample_params, decode_state, _sds((b, width), jnp.int32, sample_mesh),
                _sds((b,), jnp.int32, sample_mesh), _sds((b,), jnp.bool_, sample_mesh),
                _sds((b,), jnp.bool_, sample_mesh), _sds((b, 8), jnp.int32, sample_mesh),
                _sds((b,), keys.dtype, sample_mesh))
        # while sampling: the train state and the reference (the evaluator's sampler is
        # allocated only while it evaluates, after the rollout's is released)
        resident = device_bytes(state) + ref_bytes
        per_token = device_bytes(sample_params) + device_bytes(decode_state)
        return Program(jit_generate, args, {"max_new_tokens": r.max_new_tokens, "sampling": sampling,
                                            "span": r.max_context, "prefill_chunk": r.prefill_chunk}, resident, sample_mesh, flops[name],
                       loop_bytes=r.max_new_tokens * per_token)

    def slot_programs() -> tuple[Program, Program]:
        """The slot engine's largest calls (``Sampler.decode``): a prefill of the most rows a
        call starts at the widest prompt, its attention over the whole cache; a decode of
        ``decode_chunk`` tokens in ``decode_rows`` rows over the whole cache."""
        slots = slot_shapes(r, b, sample_mesh)
        cache = _decode_state(models.config, slots.batch_size, r.max_context, sample_mesh)
        resident = device_bytes(state) + ref_bytes
        size, rows = slots.prefill_rows(slots.decode_rows), slots.decode_rows
        vec = lambda n, dtype: _sds((n,), dtype, sample_mesh)  # noqa: E731
        keys_of = lambda n: _sds((n,), keys.dtype, sample_mesh)  # noqa: E731
        width = s.prefill_width + 1  # with the pending token
        prefill = Program(jit_prefill_slots,
                          (models.policy_def, sample_params, cache,
                           vec(size, jnp.int32) if size < slots.batch_size else None, vec(size, jnp.bool_),
                           _sds((size, s.prefill_width), jnp.int32, sample_mesh), vec(size, jnp.int32),
                           vec(size, jnp.bool_), _sds((size, 8), jnp.int32, sample_mesh), keys_of(size)),
                          {"sampling": sampling, "prefill_chunk": r.prefill_chunk}, resident, sample_mesh,
                          forward_flops(models.config, size * width, size * width * r.max_context))
        gather = rows < slots.batch_size
        per_token = device_bytes(sample_params) + device_bytes(cache) * rows // slots.batch_size
        decode = Program(jit_decode_slots,
                         (models.policy_def, sample_params, cache, vec(rows, jnp.bool_),
                          _sds((rows, 8), jnp.int32, sample_mesh), keys_of(rows), vec(rows, jnp.int32),
                          vec(rows, jnp.int32), vec(rows, jnp.int32) if gather else None, _sds((), jnp.int32, sample_mesh)),
                         {"chunk": r.decode_chunk, "sampling": sampling, "span": r.max_context}, resident, sample_mesh,
                         r.decode_chunk * forward_flops(models.config, rows, rows * r.max_context),
                         loop_bytes=r.decode_chunk * per_token)
        return prefill, decode

    # the sampler is released before the passes and the updates (Trainer.step)
    update = jax.jit(make_update(models, cfg.algo, r.temperature, tx, chunk=o.logprob_chunk,
                                 micro_batch_rows=o.micro_batch_rows), donate_argnums=0)
    out = {
        "score": Program(score, (models, params, ref, batch.tokens, batch.segment_ids),
                         {"temperature": r.temperature, "with_ref": ref is not None, "chunk": o.logprob_chunk,
                          "micro_batch_rows": o.micro_batch_rows},
                         device_bytes(opt_state), mesh, flops["score"]),
        "update": Program(update, (state, batch, minibatch), {}, ref_bytes, mesh, flops["update"]),
    }
    if r.engine == "slots":
        out["prefill"], out["decode"] = slot_programs()
    else:
        out["prefill"], out["decode"] = generate(s.prefill_width, "prefill"), generate(bucket(1) - 1, "decode")
    return out, s


# -- compiling ------------------------------------------------------------------------------------
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


_OOM = (r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm",
        r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _over_bytes(message: str) -> int | None:
    """The bytes over HBM in the TPU compiler's out-of-memory message (needed - available),
    if it says."""
    for pattern in _OOM:
        m = re.search(pattern, message)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)] - float(m.group(3)) * _UNITS[m.group(4)])
    m = re.search(r"[Ee]xceeded hbm capacity by ([\d.]+)([KMGT]?)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def compile_program(p: Program, hbm_bytes: int | None, peak_flops: float | None, bandwidth: float | None) -> dict:
    """Compiles ``p`` and returns its row of the report (``error``/``over_bytes`` when the
    compiler ran out of memory)."""
    t0 = time.perf_counter()
    devices = p.mesh.devices.size
    row = {"argument_bytes": None, "temp_bytes": None, "output_bytes": None, "alias_bytes": None, "peak_bytes": None,
           "resident_bytes": p.resident, "flops": p.flops / devices, "est_s": None}
    try:
        with jax.set_mesh(p.mesh):
            compiled = p.fn.lower(*p.args, **p.kwargs).compile()
    except Exception as err:  # XlaRuntimeError; only an out-of-memory report is an answer
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        over = _over_bytes(str(err))
        first = next((line for line in str(err).splitlines() if "memory" in line.lower()), str(err).splitlines()[0])
        return row | {"compile_s": time.perf_counter() - t0, "fits": False, "error": first.strip(),
                      "over_bytes": over}
    mem = compiled.memory_analysis()
    row |= {"argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "compile_s": time.perf_counter() - t0}
    row["peak_bytes"] = row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] - row["alias_bytes"]
    total = row["peak_bytes"] + p.resident
    row["fits"] = hbm_bytes is None or total <= hbm_bytes
    row["over_bytes"] = None if row["fits"] else total - hbm_bytes
    if peak_flops:
        est = row["flops"] / (peak_flops * MFU)
        row["est_s"] = max(est, p.loop_bytes / bandwidth) if p.loop_bytes else est
    return row


def plan(cfg: Config, devices: Sequence[Any], *, name: str, vocab_size: int, chip: Chip | None = None,
         host_devices: Sequence[Any] | None = None, only: Sequence[str] = PROGRAMS,
         log: Callable[[str], None] = lambda _: None) -> dict:
    """The report of ``cfg`` on ``devices`` (``chip`` None: host CPU devices, no HBM limit;
    ``host_devices``: see ``programs``; ``log``: a line per compile, as it goes):
    {"topology", "devices", "hbm_bytes", "fits", "shapes", "mfu", "programs": {name: row}}."""
    progs, s = programs(cfg, devices, vocab_size, host_devices)
    hbm = chip.hbm_bytes if chip else None
    rows = {}
    for n in only:
        log(f"compiling {n} for {name} ...")
        rows[n] = compile_program(progs[n], hbm, chip and chip.peak_flops, chip and chip.hbm_bandwidth)
        log(f"compiled {n} in {rows[n]['compile_s']:.1f}s" + ("" if rows[n]["fits"] else " (does not fit)"))
    if cfg.rollout.max_staleness:
        _run_together(rows, progs, hbm)
    return {"topology": name, "devices": len(devices), "hbm_bytes": hbm, "fits": all(r["fits"] for r in rows.values()),
            "mfu": MFU, "shapes": dataclasses.asdict(s), "programs": rows}


def _run_together(rows: dict, progs: dict, hbm: int | None) -> None:
    """Asynchronous training (``rollout.max_staleness`` >= 1): the sampler keeps its weights
    and cache and runs beside the scoring pass and the update, so their rows hold the largest
    compiled sampler program's peak as resident, and each sampler row the larger of theirs
    (peak + resident): every one must fit them at once. Rows are left as they are unless a
    sampler program and the score or update program both compiled."""
    sampler = [n for n in ("prefill", "decode") if n in rows and rows[n]["peak_bytes"] is not None]
    learners = [n for n in ("score", "update") if n in rows and rows[n]["peak_bytes"] is not None]
    if not sampler or not learners:
        return
    for n in learners:
        rows[n]["resident_bytes"] = progs[n].resident + max(rows[m]["peak_bytes"] for m in sampler)
    beside = max(rows[n]["peak_bytes"] + progs[n].resident for n in learners)
    for n in sampler:
        rows[n]["resident_bytes"] = beside
    for n in sampler + learners:
        row = rows[n]
        total = row["peak_bytes"] + row["resident_bytes"]
        row["fits"] = hbm is None or total <= hbm
        row["over_bytes"] = None if row["fits"] else total - hbm


# -- reporting ------------------------------------------------------------------------------------
_KNOBS = {
    "score": ("model.remat", "mesh.fsdp", "mesh.tensor", "rollout.max_context"),
    "update": ("optim.micro_batch_rows", "optim.minibatches", "model.remat", "mesh.fsdp", "mesh.tensor",
               "rollout.max_context"),
    "prefill": ("rollout.tasks_per_iter", "rollout.max_context", "mesh.fsdp", "mesh.tensor"),
    "decode": ("rollout.tasks_per_iter", "rollout.max_context", "mesh.fsdp", "mesh.tensor"),
}


_SLOT_KNOBS = ("rollout.slots", "rollout.decode_rows", "rollout.max_context", "mesh.fsdp", "mesh.tensor")


def knobs(cfg: Config, program: str) -> list[str]:
    """The config fields that would shrink ``program``'s memory, those this version has."""
    # asynchronous training holds the sampler beside the update: synchronous frees it
    out = ["rollout.max_staleness"] if cfg.rollout.max_staleness else []
    slots = cfg.rollout.engine == "slots" and program in ("prefill", "decode")
    for path in _SLOT_KNOBS if slots else _KNOBS[program]:
        section, field = path.split(".")
        if hasattr(getattr(cfg, section), field):
            out.append(path)
    return out


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def verdict(cfg: Config, report: dict) -> str | None:
    """None when everything fits, else the one line naming the program most over HBM."""
    bad = {n: r for n, r in report["programs"].items() if not r["fits"]}
    if not bad:
        return None
    name = max(bad, key=lambda n: bad[n]["over_bytes"] or 0)
    others = f" (also: {', '.join(n for n in bad if n != name)})" if len(bad) > 1 else ""
    return (f"{name} does not fit {report['topology']}: {gib(bad[name]['over_bytes'])} over the "
            f"{gib(report['hbm_bytes'])} of HBM per chip{others}; try {', '.join(knobs(cfg, name))}")


def table(report: dict) -> str:
    """The report as a human-readable table."""
    hbm = report["hbm_bytes"]
    lines = [f"{report['topology']}: {report['devices']} devices, HBM per device "
             f"{gib(hbm) if hbm else 'not limited (host CPU devices)'}",
             "shapes: " + ", ".join(f"{k} {v}" for k, v in report["shapes"].items()),
             f"{'program':<8} {'argument':>11} {'temp':>11} {'output':>11} {'peak':>11} {'resident':>11} "
             f"{'of HBM':>7} {'TFLOP/dev':>10} {'est. s':>8} {'compile s':>9}"]
    for name, r in report["programs"].items():
        total = None if r["peak_bytes"] is None else r["peak_bytes"] + r["resident_bytes"]
        share = f"{total / hbm:.0%}" if hbm and total is not None else ("OOM" if not r["fits"] else "-")
        est = f"{r['est_s']:.3g}" if r["est_s"] is not None else "-"
        lines.append(f"{name:<8} {gib(r['argument_bytes']):>11} {gib(r['temp_bytes']):>11} "
                     f"{gib(r['output_bytes']):>11} {gib(r['peak_bytes']):>11} {gib(r['resident_bytes']):>11} "
                     f"{share:>7} {r['flops'] / 1e12:>10.3g} {est:>8} {r['compile_s']:>9.1f}")
    lines.append(f"peak = argument + temp + output - alias; a program fits when peak + resident <= HBM; "
                 f"est. s assumes {report['mfu']:.0%} MFU (decode: or HBM bandwidth, if slower)")
    return "\n".join(lines)
