"""Attention over packed rows, chosen by name, without a [T, T] score array where it matters.

Two entry points, one per use:

- `self_attention`: the training / scoring forward of packed rows [B, T]: causal by token order,
  tokens attend within their segment, padding keys are never attended.
- `cached_attention`: the sampler's queries at positions `q_pos` over KV-cache slots (slot ==
  position), causal on positions.

Implementations (`IMPLEMENTATIONS`, `resolve` picks one per backend for 'auto'):

- 'dense': materialises the [B, K, G, T, S] scores; the reference, fine for tiny shapes.
- 'chunked': flash-style online softmax in plain XLA, a `lax.scan` over key blocks, with a custom
  VJP whose backward recomputes each block's probabilities from the saved log-sum-exp, so neither
  direction holds more than [B, K, G, T, block] scores. Runs anywhere, under any mesh.
- 'splash': the Pallas TPU splash-attention kernel (causal mask + segment ids), under
  `jax.shard_map` over the batch and head axes when a mesh is active.
- 'cudnn': cuDNN flash attention through `jax.nn.dot_product_attention` on GPU; masks it cannot
  express (segment ids) and dtypes it does not take (float32) go to 'chunked'.

Shapes: q [B, T, H, hd]; k, v [B, S, K, hd] with H % K == 0 — query head h reads kv head
h // (H // K) (GQA; K == 1 is MQA). Scores and softmax are float32, the scale is hd ** -0.5, the
output has q's dtype and shape. A query with no visible key gets 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from steppo_jax.sharding import einsum, logical_spec

IMPLEMENTATIONS = ("auto", "dense", "chunked", "splash", "cudnn")
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "chunked"}
_MASKED = -1e30  # finite: a fully masked block must not turn the running max into NaN
_NEVER = jnp.iinfo(jnp.int32).max  # key position no query reaches: how invalid keys are hidden
_SPLASH_BLOCKS = (512, 256, 128)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_KV = ("batch", "length", "kv_heads", "head_dim")  # logical axes of k, v [B, S, K, hd]


def resolve(impl: str, backend: str | None = None) -> str:
    """The implementation `impl` stands for: 'auto' -> 'splash' on TPU, 'cudnn' on GPU, else
    'chunked' (`backend` defaults to `jax.default_backend()`); other names are returned as is."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    return _AUTO.get(backend or jax.default_backend(), "chunked")


def self_attention(q, k, v, *, segment_ids=None, valid=None, impl: str = "dense",
                   block: int = 512, interpret: bool = False) -> jax.Array:
    """Causal attention of packed rows over their own tokens.

    q [B, T, H, hd]; k, v [B, T, K, hd]; segment_ids [B, T] int (optional): tokens attend only
    within their segment; valid [B, T] bool (optional): False marks padding, never attended (for
    'cudnn' padding must be a suffix of the row, as in right-padded step tensors). Causal means
    key index <= query index in the row. `block`: key block size of 'chunked'. `interpret`: run
    'splash' in Pallas interpret mode (tests on CPU). Returns y [B, T, H, hd] in q.dtype.
    """
    _check(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"self_attention expects keys of the same rows: q {q.shape}, k {k.shape}")
    requested, impl = impl, resolve(impl)
    if impl == "splash" and requested == "auto" and q.shape[1] % 128:
        impl = "chunked"  # splash tiles rows by 128: short or odd rows take the XLA path
    if impl == "splash":
        return _splash(q, k, v, segment_ids, valid, interpret)
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs a GPU backend, this one is "
                             f"{jax.default_backend()!r}; use 'auto' or 'chunked'")
        if segment_ids is None and q.dtype in _CUDNN_DTYPES:
            return _cudnn(q, k, v, valid)
        impl = "chunked"
    order = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
    k_pos = order if valid is None else jnp.where(valid, order, _NEVER)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if impl == "dense":
        return _dense(q, k, v, order, seg, k_pos, seg)
    return _chunked(q, k, v, order, seg, k_pos, seg, block)


def cached_attention(q, k, v, *, q_pos, impl: str = "dense", block: int = 512) -> jax.Array:
    """Queries at positions over a KV cache whose slot s holds position s.

    q [B, T, H, hd]; q_pos [B, T] int; k, v [B, S, K, hd] (cache slots 0..S-1). Query (b, t)
    attends to slots <= q_pos[b, t]. 'dense' and 'chunked' run as named; the other names take
    'chunked' for a prefill (T > 1) and 'dense' for a one-token decode. Returns [B, T, H, hd].
    """
    _check(q, k, v)
    impl = resolve(impl)
    if impl not in ("dense", "chunked"):
        impl = "chunked" if q.shape[1] > 1 else "dense"
    k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)[None]
    q_pos = q_pos.astype(jnp.int32)
    if impl == "dense":
        return _dense(q, k, v, q_pos, None, k_pos, None)
    return _chunked(q, k, v, q_pos, None, k_pos, None, block)


def _check(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention expects q [B,T,H,hd], k/v [B,S,K,hd] with H % K == 0; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")


def _visible(q_pos, q_seg, k_pos, k_seg) -> jax.Array:
    """[B, T, S] bool: key position <= query position, same segment (when given)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= k_seg[:, None, :] == q_seg[:, :, None]
    return mask


def _heads(q, kh) -> jax.Array:
    """q [B, T, H, hd] -> [B, K, G, T, hd]: query heads grouped under their kv head."""
    b, t, h, hd = q.shape
    return q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)


def _unheads(y) -> jax.Array:
    """[B, K, G, T, hd] -> [B, T, K * G, hd]."""
    b, kh, g, t, hd = y.shape
    return y.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, hd)


def _scores(qh, k, mask) -> jax.Array:
    """Scaled float32 scores [B, K, G, T, S] of qh [B, K, G, T, hd] against k [B, S, K, hd],
    masked (mask [B, T, S]) to `_MASKED`."""
    s = jnp.einsum("bkgtd,bskd->bkgts", qh, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], s * qh.shape[-1] ** -0.5, _MASKED)


def _dense(q, k, v, q_pos, q_seg, k_pos, k_seg) -> jax.Array:
    mask = _visible(q_pos, q_seg, k_pos, k_seg)
    s = _scores(_heads(q, k.shape[2]), k, mask)
    p = jnp.where(mask[:, None, None], jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    total = p.sum(-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    y = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v)
    return _unheads(y).astype(q.dtype)


def _chunked(q, k, v, q_pos, q_seg, k_pos, k_seg, block: int) -> jax.Array:
    """Pads the keys to whole blocks (padding keys sit at `_NEVER`, so no query sees them) and
    runs the blockwise kernel."""
    s = k.shape[1]
    block = min(block, s)
    pad = -s % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=_NEVER)
        if k_seg is not None:
            k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)))
    return _flash(q, k, v, q_pos, q_seg, k_pos, k_seg, block)


def _blocks(x, block: int):
    """[B, S, ...] -> [S // block, B, block, ...], the scan's leading axis (None passes)."""
    if x is None:
        return None
    b, s = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, s // block, block, *x.shape[2:]), 0, 1)


def _unblocks(x):
    """[n, B, block, ...] -> [B, n * block, ...]."""
    n, b, block = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * block, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
    return _flash_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, block)[0]


def _flash_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
    """Online softmax over key blocks: running max m, sum l and accumulator in float32."""
    qh = _heads(q, k.shape[2])

    def step(carry, blk):
        m, l, acc = carry
        kj, vj, pj, sj = blk
        mask = _visible(q_pos, q_seg, pj, sj)
        s = _scores(qh, kj, mask)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        rescale = jnp.exp(m - m_new)
        l = l * rescale + p.sum(-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(vj.dtype), vj,
                        preferred_element_type=jnp.float32)
        return (m_new, l, acc * rescale[..., None] + pv), None

    # carries derived from q so they inherit its sharding under an Explicit mesh
    acc = jnp.zeros_like(qh, jnp.float32)
    l = acc[..., 0]
    xs = (_blocks(k, block), _blocks(v, block), _blocks(k_pos, block), _blocks(k_seg, block))
    (m, l, acc), _ = jax.lax.scan(step, (l + _MASKED, l, acc), xs)
    seen = l > 0
    y = _unheads(acc / jnp.where(seen, l, 1.0)[..., None]).astype(q.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return y, (q, k, v, q_pos, q_seg, k_pos, k_seg, y, lse)


def _flash_bwd(block, res, dy):
    """Flash-attention backward: per key block, probabilities from the saved log-sum-exp;
    dq accumulates in the carry, dk/dv come out per block."""
    q, k, v, q_pos, q_seg, k_pos, k_seg, y, lse = res
    kh = k.shape[2]
    qh, dyh = _heads(q, kh), _heads(dy, kh)
    delta = jnp.einsum("bkgtd,bkgtd->bkgt", dyh, _heads(y, kh),
                       preferred_element_type=jnp.float32)
    scale = q.shape[-1] ** -0.5

    def step(dq, blk):
        kj, vj, pj, sj = blk
        mask = _visible(q_pos, q_seg, pj, sj)
        p = jnp.where(mask[:, None, None], jnp.exp(_scores(qh, kj, mask) - lse[..., None]), 0.0)
        # sums over (g, t): with H sharded but K not (MQA), the result is reduced to K's sharding
        dv = einsum("bkgts,bkgtd->bskd", p.astype(dy.dtype), dyh, _KV,
                    preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bskd->bkgts", dyh, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, kj, preferred_element_type=jnp.float32)
        dk = einsum("bkgts,bkgtd->bskd", ds, qh, _KV, preferred_element_type=jnp.float32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    xs = (_blocks(k, block), _blocks(v, block), _blocks(k_pos, block), _blocks(k_seg, block))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qh, jnp.float32), xs)
    return (_unheads(dq).astype(q.dtype), _unblocks(dk), _unblocks(dv),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _splash(q, k, v, segment_ids, valid, interpret: bool) -> jax.Array:
    """Splash attention per row (vmap over B), shard_map'd over batch and heads under a mesh.

    Padding becomes its own segment (one id above the row's largest), so padding queries attend
    only to padding keys: finite outputs, never read, and real queries never see padding.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, hd = q.shape
    kh = k.shape[2]
    if t % 128:
        raise ValueError(f"attention impl 'splash' needs T % 128 == 0, got T={t}; pad rows to a "
                         f"multiple of 128 or use impl='chunked'")
    blk = next(n for n in _SPLASH_BLOCKS if t % n == 0)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    seg = segment_ids
    if valid is not None:
        seg = jnp.zeros_like(valid, jnp.int32) if seg is None else seg.astype(jnp.int32)
        seg = jnp.where(valid, seg, seg.max(-1, keepdims=True) + 1)

    def attend(q, k, v, *seg):
        mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * q.shape[2])
        kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
        ids = sa.SegmentIds(seg[0], seg[0]) if seg else None
        qt, kt, vt = (x.swapaxes(1, 2) for x in (q * hd ** -0.5, k, v))
        return jax.vmap(kernel)(qt, kt, vt, ids).swapaxes(1, 2)

    args = (q, k, v) if seg is None else (q, k, v, seg)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(*args)
    q_spec = logical_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_spec(_KV, k.shape, mesh)
    if kh > 1 and q_spec[2] != kv_spec[2]:
        # kv heads that cannot split like the query heads would break the h // G grouping
        q_spec = P(q_spec[0], None, kv_spec[2], None)
    specs = (q_spec, kv_spec, kv_spec) + ((P(q_spec[0], None),) if seg is not None else ())
    return jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=q_spec,
                         check_vma=False)(*args)


def _cudnn(q, k, v, valid) -> jax.Array:
    """cuDNN flash attention, causal; right padding as per-row sequence lengths."""
    lengths = None if valid is None else valid.sum(-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation="cudnn")
