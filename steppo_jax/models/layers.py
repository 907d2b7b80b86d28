"""Decoder building blocks: RMSNorm, grouped-query attention, SwiGLU MLP, the residual block.

Weights are `nnx.Param`s with `logical_axes` metadata (see `steppo_jax.sharding`). They are
stored in `param_dtype` and cast to the compute dtype at use; a weight's FSDP ("embed") sharding
is gathered right before its matmul (`use_weight`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from steppo_jax.models.config import ModelConfig
from steppo_jax.models.rope import apply_rope
from steppo_jax.sharding import constrain, einsum

_MASKED = -1e30  # finite, so fully masked (padding) query rows give zeros, not NaN
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
    """Weight value in compute dtype, with its FSDP axis gathered (no-op without a mesh)."""
    names = p.get_metadata()["logical_axes"]
    value = p.get_value().astype(dtype)
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


def make_mask(q_pos, k_pos, q_seg=None, k_seg=None, k_valid=None) -> jax.Array:
    """Boolean mask [B, Tq, Tk]: causal on positions, same segment, valid key."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v(/o) bias and Qwen3 q/k RMSNorm."""

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

    def __call__(self, x, cos, sin, mask, kv=None, slots=None):
        """x [B,T,D]; cos/sin [B,T,hd]; mask [B,T,S] bool.

        Without `kv`, keys are x's own tokens (S = T). With `kv = (k, v)` ([B,L,K,hd] each), this
        call's keys/values are first written at cache `slots` [B,T] (out-of-range slots are
        dropped), then queries attend over the first S <= L slots. Returns (y [B,T,D], kv).
        """
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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = _write(kv[0], slots, k), _write(kv[1], slots, v)
            kv = (k, v)
            k, v = k[:, :mask.shape[-1]], v[:, :mask.shape[-1]]
        y = grouped_attention(q, k.astype(dt), v.astype(dt), mask)
        out = einsum("bthk,hkd->btd", y, use_weight(self.o, dt), ACT)
        if cfg.o_bias:
            out = out + use_weight(self.o_bias, dt)
        return out, kv


@jax.vmap
def _write(cache, slots, new):
    """Per row: cache [L,K,hd] with new [T,K,hd] written at slots [T] (out-of-range dropped)."""
    return cache.at[slots].set(new.astype(cache.dtype), mode="drop")


def grouped_attention(q, k, v, mask) -> jax.Array:
    """Softmax attention. q [B,T,H,hd], k/v [B,S,K,hd], mask [B,T,S] -> [B,T,H,hd].

    Query head h uses key/value head h // (H // K). Scores and softmax in float32.
    """
    b, t, h, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(b, t, h, hd)


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

    def __call__(self, x, cos, sin, mask, kv=None, slots=None):
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, kv, slots)
        x = constrain(x + a, ACT)
        x = constrain(x + self.mlp(self.mlp_norm(x)), ACT)
        return x, kv
