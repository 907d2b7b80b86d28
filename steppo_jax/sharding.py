"""Meshes and the one logical-axis rule table.

Every parameter carries logical axis names (metadata `logical_axes` on its `nnx.Variable`);
`RULES` maps each name to mesh axes of a (data, fsdp, tensor) mesh. A mesh axis that is absent
from the mesh, or that does not divide the dimension, is dropped (that dimension is replicated
over it), so one table serves every mesh shape.
"""

from __future__ import annotations

import math

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None: replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": None,
    "norm": None,
    "length": None,
    "layers": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, explicit: bool = True,
              devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Explicit (default) or Auto axis types."""
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(kind,) * 3,
                         devices=devices)


# The sampler's layout: weights sharded over tensor only, whole over (data, fsdp), so decoding
# never gathers FSDP shards per token. Resharded once per policy update.
DECODE_RULES = {**RULES, "embed": None}


def logical_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                 mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                 rules: dict[str, tuple[str, ...] | None] = RULES) -> P:
    """PartitionSpec for logical axis `names` (one per dimension) under `rules`.

    With `mesh` (and `shape`), mesh axes missing from the mesh or not dividing the dimension are
    dropped; a mesh axis is used at most once per spec.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = []
        size = 1
        for axis in (rules[name] or ()) if name is not None else ():
            if axis in used:
                continue
            if mesh is not None:
                if axis not in mesh.axis_names:
                    continue
                n = mesh.shape[axis]
                if shape is not None and shape[i] % (size * n):
                    continue
                size *= n
            axes.append(axis)
            used.add(axis)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def batch_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None) -> int:
    """How many ways the logical ``batch`` axis is split on ``mesh`` (1 without one): a batch's
    rows must be a multiple of it."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in RULES["batch"] or () if a in mesh.axis_names)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules=RULES) -> Any:
    """NamedSharding tree for an `nnx.State` (concrete or abstract) from `logical_axes` metadata
    (`rules`: `RULES` for training, `DECODE_RULES` for the sampler's copy)."""

    def one(v):
        names = v.get_metadata().get("logical_axes") or (None,) * v.get_value().ndim
        return v.replace(NamedSharding(mesh, logical_spec(names, v.get_value().shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=_is_var)


def abstract_state(state: Any, mesh: jax.sharding.Mesh, rules=RULES, dtype=None) -> Any:
    """An `nnx.State` (concrete or abstract) as `jax.ShapeDtypeStruct` leaves carrying their
    `state_shardings` on `mesh` under `rules` (what `jit(...).lower` takes for ahead-of-time
    compiles); floating leaves take `dtype` when given (the sampler's copy)."""
    def one(x, s):
        cast = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(x.shape, dtype if cast else x.dtype, sharding=s)
    return jax.tree.map(one, state, state_shardings(state, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins activation/weight `x` to the sharding of logical `names` under the current mesh.

    No-op without a mesh. Explicit axes are resharded (`jax.sharding.reshard`), Auto axes get a
    sharding constraint. Used inside model code to gather FSDP-sharded weights before a matmul
    and to keep activations batch-sharded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_spec(names, x.shape, mesh)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def take_rows(table: jax.Array, ids: jax.Array | tuple, out_names: Sequence[str | None]) -> jax.Array:
    """table[ids] (an embedding lookup; ``ids`` may be a tuple of index arrays over the
    leading axes) whose result has the sharding of logical `out_names`."""
    mesh = jax.sharding.get_abstract_mesh()
    index = ids if isinstance(ids, tuple) else (ids,)
    if mesh.empty or not all(t == AxisType.Explicit for t in mesh.axis_types):
        return constrain(table[index] if isinstance(ids, tuple) else jnp.take(table, ids, axis=0), out_names)
    shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in index)) + table.shape[len(index):]
    return table.at[index].get(out_sharding=logical_spec(out_names, shape, mesh))


def put_rows(x: jax.Array, index: tuple, update: jax.Array, update_names: Sequence[str | None],
             mode: str | None = None) -> jax.Array:
    """``x.at[index].set(update, mode=mode)`` (``index``: index arrays over x's leading axes),
    keeping x's sharding. Under a mesh the update takes logical ``update_names`` (a scatter
    wants it unsharded over the indexed rows) and the output x's sharding, named."""
    if jax.sharding.get_abstract_mesh().empty:
        return x.at[index].set(update, mode=mode)
    return x.at[index].set(constrain(update, update_names), mode=mode, out_sharding=jax.typeof(x).sharding.spec)


def einsum(eq: str, a: jax.Array, b: jax.Array, out_names: Sequence[str | None],
           **kwargs) -> jax.Array:
    """`jnp.einsum` whose output takes the sharding of logical `out_names`.

    Under Explicit axes this resolves contractions over sharded dimensions (e.g. heads or mlp
    over `tensor`) by naming the output sharding; elsewhere it is a constrained einsum.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(t == AxisType.Explicit for t in mesh.axis_types):
        return constrain(jnp.einsum(eq, a, b, **kwargs), out_names)
    ins, out = eq.replace(" ", "").split("->")
    sizes = {}
    for letters, x in zip(ins.split(","), (a, b)):
        letters = letters.replace("...", "")
        sizes.update(zip(letters, x.shape[x.ndim - len(letters):]))
    lead = a.shape[:a.ndim - len(ins.split(",")[0].replace("...", ""))]
    shape = tuple(lead) + tuple(sizes[c] for c in out.replace("...", ""))
    return jnp.einsum(eq, a, b, out_sharding=logical_spec(out_names, shape, mesh), **kwargs)
