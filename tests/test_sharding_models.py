"""Sharded (8 host CPU devices, data x fsdp x tensor mesh) init, forward, backward, sampling and
checkpoint loading equal single-device results. Runs in a subprocess so XLA_FLAGS is set before
JAX starts."""

import subprocess
import sys

import pytest

from tests.devices import subprocess_env


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_sharded_equals_single_device(axis_types, tmp_path):
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, __file__, axis_types, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ALL OK" in proc.stdout


def _main(axis_types: str, tmp: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from steppo_jax import sharding
    from steppo_jax.models import (Decoder, ModelConfig, create_sharded, load_hf_checkpoint,
                                   save_hf_checkpoint, token_logprobs)
    from steppo_jax.sampling import Sampler, SamplingParams, reply_keys

    assert jax.device_count() == 8
    cfg = ModelConfig(model_type="qwen2", vocab_size=128, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True, o_bias=False)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, explicit=axis_types == "explicit")
    ref = Decoder(cfg, rngs=nnx.Rngs(0))
    model = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)

    # placement: parameters are born sharded by the rule table
    q = model.layers.attn.q.get_value()  # stacked layers: [L, D, H, hd]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding
    assert model.embed.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.layers.attn.k_bias.get_value().sharding.spec == P(None, "tensor", None)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ref))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)

    # forward + backward
    tokens = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)
    seg = np.repeat(np.array([[0] * 10 + [1] * 6]), 4, axis=0).astype(np.int32)

    def loss_fn(graphdef):
        def loss(state, t, s):
            logits = nnx.merge(graphdef, state)(t, segment_ids=s)
            return -jnp.mean(token_logprobs(logits, t)), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    gd, st = nnx.split(model)
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        (l, logits), g = loss_fn(gd)(st, jax.device_put(tokens, batch), jax.device_put(seg, batch))
    gd0, st0 = nnx.split(ref)
    (l0, logits0), g0 = loss_fn(gd0)(st0, tokens, seg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), atol=1e-5)
    np.testing.assert_allclose(float(l), float(l0), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    if axis_types == "explicit":  # gradients carry their parameters' shardings in their types
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(st)):
            assert a.sharding.spec == b.sharding.spec

    # sampling: two turns, greedy and stochastic (same key), per-row stop sets
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=0.8, top_k=20)):
        outs = []
        for m, mh in ((model, mesh), (ref, None)):
            s = Sampler(m, batch_size=4, capacity=64, max_new_tokens=8, sampling=sp, mesh=mh)
            o1 = s.step(prompts, [[5], [6], [7], [8]], jax.random.key(0), reset=True)
            o2 = s.step([[11], None, [12, 13], [14]], [[5], [6], [7], [8]], jax.random.key(1))
            outs.append((o1, o2))
        for a, b in zip(*outs):
            assert a.tokens == b.tokens, (a.tokens, b.tokens)
            for x, y in zip(a.logprobs, b.logprobs):
                np.testing.assert_allclose(x, y, atol=1e-5)

    # slot decoding, 8 conversations 4 at a time, the first 4 resumed after the others ran,
    # then 2 of them alone: unsharded with parked caches (4 decode rows, each call reading and
    # writing its rows of the cache in place), on the mesh every call on all 8 rows (a sharded
    # batch is never gathered; parking there is an error)
    keys = reply_keys(jax.random.key(2), jnp.zeros(8, jnp.int32), jnp.arange(8))
    greedy = SamplingParams(greedy=True)
    try:
        Sampler(model, batch_size=8, capacity=64, max_new_tokens=6, mesh=mesh, decode_rows=4)
        raise AssertionError("decode_rows below the slots on a sharded batch must be refused")
    except ValueError as err:
        assert "needs the sampler's batch on one device" in str(err)
    outs = []
    for m, mh, parked in ((model, mesh, None), (ref, None, 4)):
        s = Sampler(m, batch_size=8, capacity=64, max_new_tokens=6, sampling=greedy, mesh=mh, decode_rows=parked)
        drawn = []
        for rows, offset in ((range(4), 0), (range(4, 8), 0), (range(4), 3), (range(4, 6), 3)):
            new = [(prompts[r % 4] if offset == 0 else []) if r in rows else None for r in range(8)]
            out = s.decode(new, [], keys, [offset if r in rows else 0 for r in range(8)], [offset == 0] * 8, 3)
            drawn.append(out.tokens)
        outs.append(drawn)
    assert outs[0] == outs[1] and sum(len(t) for t in outs[0][2]) > 0, outs

    # loading a checkpoint straight into shards
    save_hf_checkpoint(ref, tmp)
    loaded, _ = load_hf_checkpoint(tmp, dtype="float32", mesh=mesh)
    assert loaded.layers.mlp.down.get_value().sharding.spec == P(None, "tensor", "fsdp")
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(ref))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("ALL OK")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
