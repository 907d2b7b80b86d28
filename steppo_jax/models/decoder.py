"""The decoder (policy trunk + LM head), the value head and the separate critic."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from steppo_jax import sharding
from steppo_jax.models.config import ModelConfig
from steppo_jax.models.layers import ACT, Block, RMSNorm, param, use_weight
from steppo_jax.models.rope import rope_tables


def default_positions(tokens, segment_ids=None, attention_mask=None) -> jax.Array:
    """Positions [B, T]: 0.. within each segment (contiguous segments), else counting only
    non-padding tokens (so left padding starts at 0), else 0..T-1."""
    idx = jnp.cumsum(jnp.ones_like(tokens, jnp.int32), axis=1) - 1  # derived from data: keeps its sharding
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
            axis=1)
        return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return idx


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keeps the projections' outputs (matmuls without batch dimensions), recomputes the rest
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """`cfg.n_layers` blocks as one `Block` whose parameters carry a leading "layers" axis."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, rngs=r)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable):
            var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
    return blocks


class Decoder(nnx.Module):
    """Llama3 / Qwen2 / Qwen3 causal decoder.

    `model(tokens [B,T]) -> logits [B,T,V] float32`; `model.hidden(...) -> [B,T,D]` is the
    final-norm output (what the LM head and a value head read). `lm_head=False` builds a trunk
    only (for a separate critic); then `logits` is unavailable unless embeddings are tied.

    The layers are one stacked `Block` (every parameter [L, ...]) run under `lax.scan`, so
    compile time does not grow with depth; `config.remat` rematerialises each block in the
    backward pass.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        cfg = config
        pd = cfg.jnp_param_dtype
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)
        self.layers = _stacked_blocks(cfg, rngs)
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, pd)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

    # -- training / scoring forward ------------------------------------------------------------
    def hidden(self, tokens, positions=None, segment_ids=None, attention_mask=None) -> jax.Array:
        """Final hidden states [B,T,D] (compute dtype) of a packed batch.

        tokens [B,T] int; positions [B,T] (default: `default_positions`); segment_ids [B,T]
        (tokens attend only within their segment); attention_mask [B,T] bool (False = padding,
        never attended to). Attention is causal by token order within a segment.
        """
        if positions is None:
            positions = default_positions(tokens, segment_ids, attention_mask)
        x = self._embed(tokens)
        cos, sin = rope_tables(self.config, positions)
        graphdef, stacked = nnx.split(self.layers)

        def body(x, layer):
            return nnx.merge(graphdef, layer)(x, cos, sin, segment_ids, attention_mask), None

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, stacked)
        return self.norm(x)

    def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None) -> jax.Array:
        """Logits [B,T,V] float32; arguments as in `hidden`."""
        return self.logits(self.hidden(tokens, positions, segment_ids, attention_mask))

    def lm_weight(self, dtype) -> jax.Array:
        """The LM head's weight [D, V] in ``dtype`` (the embedding's transpose when tied)."""
        return use_weight(self.embed, dtype).T if self.config.tie_embeddings else use_weight(self.lm_head, dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head: hidden [..., D] -> logits [..., V] float32."""
        return jnp.einsum("...d,dv->...v", h, self.lm_weight(h.dtype), preferred_element_type=jnp.float32)

    # -- cached forward (sampling) -------------------------------------------------------------
    def extend(self, tokens, positions, valid, kv, span: int | None = None, rows=None):
        """Appends tokens to a KV cache and returns their hidden states.

        tokens, positions [B,T] int32; valid [B,T] bool; kv: (k, v), each [B,L,C,K,hd] (see
        `init_kv`). Cache slot == position: token (b,t) is written at slot positions[b,t] when
        valid (invalid ones are dropped), then attends to slots <= its position. The caller keeps
        every slot below a row's new positions filled. `span` (static, default C): attend over
        slots [0, span) only, which must cover every position in this call; it saves reading the
        cache's unused tail. ``rows`` [B] (distinct, optional): the tokens' rows are these rows
        of a larger cache [B', L, C, K, hd], read and written in place a layer at a time (no
        copy of their caches); None: row b is cache row b. Returns (hidden [B,T,D], kv).
        """
        cap = kv[0].shape[2]
        slots = jnp.where(valid, positions, cap)
        x = self._embed(tokens)
        cos, sin = rope_tables(self.config, positions)
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, layer):
            x, kv, i = carry
            x, kv = nnx.merge(graphdef, layer).extend(x, cos, sin, kv, i, slots, positions, span or cap, rows)
            return (x, kv, i + 1), None

        (x, kv, _), _ = jax.lax.scan(body, (x, kv, jnp.zeros((), jnp.int32)), stacked)
        return self.norm(x), kv

    def _embed(self, tokens) -> jax.Array:
        dt = self.config.jnp_dtype
        table = sharding.constrain(self.embed.get_value().astype(dt), (None, None))
        return sharding.take_rows(table, tokens, ACT)


def init_kv(config: ModelConfig, batch: int, capacity: int):
    """An empty cache (k, v): zeros [batch, L, capacity, K, hd] each (compute dtype),
    batch-sharded over (data, fsdp) and kv heads over tensor under a mesh."""
    shape = (batch, config.n_layers, capacity, config.n_kv_heads, config.head_dim)
    names = ("batch", "layers", "length", "kv_heads", "head_dim")
    zeros = lambda: sharding.constrain(jnp.zeros(shape, config.jnp_dtype), names)  # noqa: E731
    return zeros(), zeros()


class ValueHead(nnx.Module):
    """Linear value head: hidden [B,T,D] -> values [B,T] float32."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_model,), ("embed",), jnp.float32)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, h: jax.Array) -> jax.Array:
        return h.astype(jnp.float32) @ use_weight(self.kernel, jnp.float32) + self.bias.get_value()


class Critic(nnx.Module):
    """Separate critic: a decoder trunk (no LM head) + `ValueHead`. tokens [B,T] -> values [B,T].

    `trunk` (e.g. a loaded policy's copy) replaces the freshly initialised one.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, trunk: Decoder | None = None):
        self.trunk = trunk if trunk is not None else Decoder(config, rngs=rngs, lm_head=False)
        self.value_head = ValueHead(config.d_model, rngs=rngs)

    def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None) -> jax.Array:
        return self.value_head(self.trunk.hidden(tokens, positions, segment_ids, attention_mask))


def create_sharded(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh) -> nnx.Module:
    """Builds `make()` with every parameter created directly in its sharding on `mesh`
    (shapes come from `nnx.eval_shape`; nothing is materialised on one device first)."""
    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abs_state, mesh)

    def build():
        return nnx.state(make())

    with jax.set_mesh(mesh):
        state = jax.jit(build, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
