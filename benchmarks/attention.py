"""Temp memory of attention forward + backward: 'dense' vs 'chunked', compiled, never run.

For B=1, H=8, K=2, hd=64 and T in (2048, 8192), packed rows (segment ids + padding), float32:
XLA's compiled temp size (`memory_analysis().temp_size_in_bytes`) of the gradient of a linear
functional of `self_attention` wrt q, k, v. Programs are lowered from abstract shapes, so the
dense T=8192 program (several GiB of scores) is only compiled, not allocated.

    PYTHONPATH=. .venv/bin/python benchmarks/attention.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from steppo_jax.models.attention import self_attention

B, H, K, HD = 1, 8, 2, 64
LENGTHS = (2048, 8192)


def temp_bytes(impl: str, t: int) -> int:
    """Compiled temp bytes of grad wrt (q, k, v) of sum(w * self_attention(q, k, v))."""

    def loss(q, k, v, w, seg, valid):
        y = self_attention(q, k, v, segment_ids=seg, valid=valid, impl=impl)
        return jnp.sum(w * y)

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (f32(B, t, H, HD), f32(B, t, K, HD), f32(B, t, K, HD), f32(B, t, H, HD),
            jax.ShapeDtypeStruct((B, t), jnp.int32), jax.ShapeDtypeStruct((B, t), jnp.bool_))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    print(f"backend {jax.default_backend()}, B={B} H={H} K={K} hd={HD}, float32, fwd+bwd")
    print(f"{'T':>6} {'dense MiB':>10} {'chunked MiB':>12} {'dense/chunked':>14}")
    for t in LENGTHS:
        dense, chunked = temp_bytes("dense", t), temp_bytes("chunked", t)
        print(f"{t:>6} {dense / 2**20:>10.1f} {chunked / 2**20:>12.1f} {dense / chunked:>14.1f}")


if __name__ == "__main__":
    main()
