"""Attention implementations: 'chunked' and 'splash' (Pallas interpret mode) equal 'dense' in
forward and gradients on packed, padded, GQA/MQA rows; the cached path; `resolve`; and chunked
under an explicit (data, fsdp, tensor) mesh of 8 host CPU devices (own process, so XLA_FLAGS is
set before JAX starts) equal to one device."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from steppo_jax.models import attention
from tests.devices import subprocess_env

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(seed, b, t, h, kh, hd, s=None):
    rng = np.random.default_rng(seed)
    s = s or t
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, s, kh, hd)).astype(np.float32)
    v = rng.normal(size=(b, s, kh, hd)).astype(np.float32)
    w = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    return q, k, v, w


def _packed(seed, b, t, lengths, n_segments):
    """segment_ids [B, T] (sorted, n_segments per row) and valid [B, T] (first lengths[b])."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, n_segments, (b, t)), axis=1).astype(np.int32)
    valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
    return seg, valid


def _forward_and_grads(fn, q, k, v, w):
    """y and the gradients of sum(w * y) wrt q, k, v, in one jitted program."""

    @jax.jit
    def run(q, k, v, w):
        y, vjp = jax.vjp(fn, q, k, v)
        return y, vjp(w)

    return run(q, k, v, w)


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


CASES = {  # name: (B, T, H, K, hd, block, lengths or None, segments or None)
    # row 0 right-padded, row 1 plain causal; GQA; T = 21 not a multiple of the block
    "gqa_padded_ragged_t": (2, 21, 4, 2, 8, 8, (17, 21), None),
    # several segments per row plus padding; MQA
    "mqa_packed_padded": (2, 16, 4, 1, 8, 8, (13, 16), 3),
    # one block larger than the row; MHA
    "block_over_t": (1, 12, 2, 2, 8, 512, (9,), 2),
}


@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_dense(case):
    b, t, h, kh, hd, block, lengths, n_seg = CASES[case]
    q, k, v, w = _qkv(0, b, t, h, kh, hd)
    seg, valid = _packed(1, b, t, lengths or (t,) * b, n_seg or 1)
    kwargs = dict(segment_ids=seg if n_seg else None, valid=valid if lengths else None)
    if lengths:  # padding queries' outputs are never read: leave them out of the functional
        w = w * valid[:, :, None, None]

    def attend(impl):
        return lambda q, k, v: attention.self_attention(q, k, v, impl=impl, block=block, **kwargs)

    dense = _forward_and_grads(attend("dense"), q, k, v, w)
    chunked = _forward_and_grads(attend("chunked"), q, k, v, w)
    _assert_close(chunked, dense)
    assert np.all(np.isfinite(np.asarray(chunked[0])))


def test_dense_matches_direct_softmax():
    """The 'dense' reference against a per-(row, head, query) softmax written out in numpy."""
    b, t, h, kh, hd = 1, 9, 2, 1, 4
    q, k, v, _ = _qkv(3, b, t, h, kh, hd)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2]], np.int32)
    valid = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0]], bool)
    y = np.asarray(attention.self_attention(q, k, v, segment_ids=seg, valid=valid))
    for i in range(t):
        keys = [j for j in range(i + 1) if seg[0, j] == seg[0, i] and valid[0, j]]
        for hh in range(h):
            if not keys:  # no visible key: zeros
                np.testing.assert_array_equal(y[0, i, hh], 0.0)
                continue
            s = np.array([q[0, i, hh] @ k[0, j, 0] for j in keys]) / np.sqrt(hd)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(y[0, i, hh], p @ v[0, keys, 0], **TOL)


@pytest.mark.parametrize("t", [5, 1])
def test_cached_chunked_equals_dense(t):
    """A prefill of t tokens at per-row offsets (t > 1) and a one-token decode (t == 1); the
    sampler needs no gradients, and 'chunked' shares its VJP with `self_attention`."""
    b, h, kh, hd, s = 3, 4, 2, 8, 19
    q, k, v, _ = _qkv(4, b, t, h, kh, hd, s)
    q_pos = np.array([0, 7, 14])[:, None] + np.arange(t)[None]
    attend = jax.jit(attention.cached_attention, static_argnames=("impl", "block"))
    _assert_close(attend(q, k, v, q_pos=q_pos, impl="chunked", block=8),
                  attend(q, k, v, q_pos=q_pos, impl="dense"))


def test_splash_interpret_equals_dense():
    """Packed + right-padded rows, GQA; forward and gradients on valid query positions."""
    b, t, h, kh, hd = 2, 256, 4, 2, 16
    q, k, v, w = _qkv(6, b, t, h, kh, hd)
    seg, valid = _packed(7, b, t, (200, 256), 3)
    w = w * valid[:, :, None, None]

    def attend(impl):
        return lambda q, k, v: attention.self_attention(q, k, v, segment_ids=seg, valid=valid,
                                                        impl=impl, interpret=True)

    splash = _forward_and_grads(attend("splash"), q, k, v, w)
    dense = _forward_and_grads(attend("dense"), q, k, v, w)
    mask = valid[:, :, None, None]
    np.testing.assert_allclose(np.where(mask, splash[0], 0), np.where(mask, dense[0], 0), **TOL)
    assert np.all(np.isfinite(np.asarray(splash[0])))
    _assert_close(splash[1], dense[1])


def test_splash_needs_t_multiple_of_128():
    q, k, v, _ = _qkv(0, 1, 96, 2, 2, 8)
    with pytest.raises(ValueError, match="T % 128"):
        attention.self_attention(q, k, v, impl="splash", interpret=True)


def test_resolve():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "cpu") == "chunked"
    assert attention.resolve("auto") == attention.resolve("auto", jax.default_backend())
    for name in ("dense", "chunked", "splash", "cudnn"):
        assert attention.resolve(name, "tpu") == name
    with pytest.raises(ValueError, match="dense, chunked"):
        attention.resolve("flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cudnn is valid on GPU")
def test_cudnn_off_gpu_errors():
    q, k, v, _ = _qkv(0, 1, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="needs a GPU"):
        attention.self_attention(q, k, v, impl="cudnn")


def test_bad_shapes_error():
    q, k, v, _ = _qkv(0, 1, 8, 3, 2, 8)
    with pytest.raises(ValueError, match="H % K"):
        attention.self_attention(q, k, v, impl="chunked")
    q, k, v, _ = _qkv(0, 1, 8, 2, 2, 8, s=6)
    with pytest.raises(ValueError, match="same rows"):
        attention.self_attention(q, k, v)


def test_chunked_sharded_equals_single_device():
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ALL OK" in proc.stdout


def _sharded_main() -> None:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from steppo_jax import sharding

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    b, t = 4, 20
    seg, valid = _packed(1, b, t, (20, 15, 18, 9), 2)
    for h, kh in ((4, 2), (4, 1)):
        q, k, v, w = _qkv(0, b, t, h, kh, 8)

        def attend(q, k, v):
            return attention.self_attention(q, k, v, segment_ids=seg, valid=valid,
                                            impl="chunked", block=8)

        ref = _forward_and_grads(attend, q, k, v, w)
        heads = lambda x: jax.device_put(x, NamedSharding(  # noqa: E731
            mesh, sharding.logical_spec(("batch", None, "heads", None), x.shape, mesh)))
        kv_heads = lambda x: jax.device_put(x, NamedSharding(  # noqa: E731
            mesh, sharding.logical_spec(("batch", None, "kv_heads", None), x.shape, mesh)))
        with jax.set_mesh(mesh):
            seg_s, valid_s = (jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
                              for x in (seg, valid))

            def attend_sharded(q, k, v):
                return attention.self_attention(q, k, v, segment_ids=seg_s, valid=valid_s,
                                                impl="chunked", block=8)

            y, (dq, dk, dv) = _forward_and_grads(attend_sharded, heads(q), kv_heads(k),
                                                 kv_heads(v), heads(w))
        assert y.sharding.spec == heads(q).sharding.spec, y.sharding
        assert dk.sharding.spec == kv_heads(k).sharding.spec, dk.sharding
        _assert_close((y, (dq, dk, dv)), ref)
        print(f"H={h} K={kh}: sharded chunked == single device")
    print("ALL OK")


if __name__ == "__main__":
    _sharded_main()
