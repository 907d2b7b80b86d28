"""Decoder building blocks: RMSNorm, grouped-query attention, SwiGLU MLP, the residual block.

Weights are `nnx.Param`s with `logical_axes` metadata (see `steppo_jax.sharding`). They are
stored in `param_dtype` (float32 master weights by default) and cast to the compute dtype at
use, so a weight's FSDP ("embed") shards are gathered in the compute dtype right before its
matmul (`use_weight`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from steppo_jax.models import attention
from steppo_jax.models.config import ModelConfig
from steppo_jax.models.rope import apply_rope
from steppo_jax.sharding import constrain, einsum, put_rows, take_rows

ACT = ("batch", "length", None)  # logical axes of a [B, T, D] activation
HEADS = ("batch", "length", "heads", None)
KV_HEADS = ("batch", "length", "kv_heads", None)
MLP_ACT = ("batch", "length", "mlp")


def param(rngs: nnx.Rngs | None, shape, names, dtype, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; init is 'normal' (std 0.02, needs rngs), 'ones' or
    'zeros'."""
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(names))


def use_weight(p: nnx.Param, dtype) -> jax.Array:
    """Weight value in compute dtype, with its FSDP axis gathered (no-op without a mesh).

    Inside the layer scan a stacked weight arrives as one layer's slice: its names lose the
    leading "layers" axis.
    """
    value = p.get_value().astype(dtype)
    names = p.get_metadata()["logical_axes"][-value.ndim:] if value.ndim else ()
    return constrain(value, tuple(None if n == "embed" else n for n in names))


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis, statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = param(None, (dim,), ("norm",), dtype, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight.get_value().astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v(/o) bias and Qwen3 q/k RMSNorm.

    The attention kernel itself is `steppo_jax.models.attention`, chosen by `cfg.attention`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = cfg.jnp_param_dtype
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros")
        if cfg.o_bias:
            self.o_bias = param(rngs, (d,), ("norm",), pd, "zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps, pd)
            self.k_norm = RMSNorm(hd, cfg.rms_eps, pd)

    def _qkv(self, x, cos, sin):
        """x [B,T,D] -> q [B,T,H,hd], k, v [B,T,K,hd], rotated."""
        cfg, dt = self.cfg, x.dtype
        q = einsum("btd,dhk->bthk", x, use_weight(self.q, dt), HEADS)
        k = einsum("btd,dhk->bthk", x, use_weight(self.k, dt), KV_HEADS)
        v = einsum("btd,dhk->bthk", x, use_weight(self.v, dt), KV_HEADS)
        if cfg.qkv_bias:
            q = q + use_weight(self.q_bias, dt)
            k = k + use_weight(self.k_bias, dt)
            v = v + use_weight(self.v_bias, dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, y):
        out = einsum("bthk,hkd->btd", y, use_weight(self.o, y.dtype), ACT)
        if self.cfg.o_bias:
            out = out + use_weight(self.o_bias, y.dtype)
        return out

    def __call__(self, x, cos, sin, segment_ids=None, valid=None):
        """Self-attention of packed rows: x [B,T,D]; cos/sin [B,T,hd]; segment_ids [B,T];
        valid [B,T] bool (False = padding). Causal by token order within a segment."""
        q, k, v = self._qkv(x, cos, sin)
        y = attention.self_attention(q, k, v, segment_ids=segment_ids, valid=valid,
                                     impl=self.cfg.attention, block=self.cfg.attention_block)
        return self._out(y)

    def extend(self, x, cos, sin, cache, layer, slots, positions, span: int, rows=None):
        """Cached attention: this call's keys/values are written into layer `layer` of the
        stacked cache (k, v) [B,L,C,K,hd] at `slots` [B,T] (out-of-range slots are dropped),
        then queries at `positions` [B,T] attend over cache slots [0, span). `rows` [B]
        (distinct, optional): x's rows are these rows of the cache (a gather of this layer's
        slots, a scatter of the new ones). Returns (y [B,T,D], cache)."""
        q, k, v = self._qkv(x, cos, sin)
        if rows is None:
            cache = tuple(_write(c, layer, slots, new) for c, new in zip(cache, (k, v)))
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False)[:, :span].astype(x.dtype)
                    for c in cache)
        else:
            at = (rows[:, None], layer)
            cache = tuple(put_rows(c, at + (slots,), new.astype(c.dtype), (None, None, "kv_heads", "head_dim"),
                                   mode="drop") for c, new in zip(cache, (k, v)))
            window = at + (jnp.arange(span)[None],)
            k, v = (take_rows(c, window, ("batch", "length", "kv_heads", "head_dim")).astype(x.dtype)
                    for c in cache)
        y = attention.cached_attention(q, k, v, q_pos=positions, impl=self.cfg.attention,
                                       block=self.cfg.attention_block)
        return self._out(y), cache


@functools.partial(jax.vmap, in_axes=(0, None, 0, 0))
def _write(cache, layer, slots, new):
    """Per row: cache [L,C,K,hd] with new [T,K,hd] written at (layer, slots) (out-of-range
    slots dropped). Batch-first, so the scatter updates the cache in place."""
    return cache.at[layer, slots].set(new.astype(cache.dtype), mode="drop")


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = cfg.jnp_param_dtype
        d, f = cfg.d_model, cfg.mlp_dim
        self.cfg = cfg
        self.gate = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down = param(rngs, (f, d), ("mlp", "embed"), pd)
        if cfg.mlp_bias:
            self.gate_bias = param(rngs, (f,), ("mlp",), pd, "zeros")
            self.up_bias = param(rngs, (f,), ("mlp",), pd, "zeros")
            self.down_bias = param(rngs, (d,), ("norm",), pd, "zeros")

    def __call__(self, x):
        dt = x.dtype
        g = einsum("btd,df->btf", x, use_weight(self.gate, dt), MLP_ACT)
        u = einsum("btd,df->btf", x, use_weight(self.up, dt), MLP_ACT)
        if self.cfg.mlp_bias:
            g, u = g + use_weight(self.gate_bias, dt), u + use_weight(self.up_bias, dt)
        y = einsum("btf,fd->btd", jax.nn.silu(g) * u, use_weight(self.down, dt), ACT)
        if self.cfg.mlp_bias:
            y = y + use_weight(self.down_bias, dt)
        return y


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = cfg.jnp_param_dtype
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pd)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids=None, valid=None):
        x = constrain(x + self.attn(self.attn_norm(x), cos, sin, segment_ids, valid), ACT)
        return constrain(x + self.mlp(self.mlp_norm(x)), ACT)

    def extend(self, x, cos, sin, cache, layer, slots, positions, span: int, rows=None):
        a, cache = self.attn.extend(self.attn_norm(x), cos, sin, cache, layer, slots, positions, span, rows)
        x = constrain(x + a, ACT)
        return constrain(x + self.mlp(self.mlp_norm(x)), ACT), cache
