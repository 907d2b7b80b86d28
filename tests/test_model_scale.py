"""The decoder at scale: attention kernels, rematerialisation, scanned layers, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from steppo_jax.models import Decoder, ModelConfig, token_logprobs
from steppo_jax.train.config import OptimSection
from steppo_jax.train.state import make_optimizer

CFG = ModelConfig(model_type="qwen3", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, mlp_dim=64, qk_norm=True, attention="dense")


def _batch():
    """Two rows of 24: a right-padded row and a row with two packed segments plus padding."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 96, (2, 24)).astype(np.int32)
    seg = np.array([[0] * 18 + [1] * 6, [0] * 9 + [1] * 11 + [2] * 4], np.int32)
    valid = np.array([[True] * 18 + [False] * 6, [True] * 20 + [False] * 4])
    return tokens, seg, valid


def _loss_and_grads(cfg, params_from=None):
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    if params_from is not None:
        state = params_from
    tokens, seg, valid = _batch()

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids=seg, attention_mask=valid)
        lp = token_logprobs(logits, tokens)
        return -jnp.sum(jnp.where(valid, lp, 0.0)) / valid.sum(), jnp.where(valid[..., None], logits, 0.0)

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return value, logits, grads, state


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_keeps_loss_and_gradients(remat):
    v0, l0, g0, state = _loss_and_grads(CFG)
    v1, l1, g1, _ = _loss_and_grads(CFG.replace(remat=remat), params_from=state)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-5)
    _assert_trees_close(g1, g0, atol=1e-6)


@pytest.mark.parametrize("attention", ["chunked", "auto"])
def test_model_attention_kernels_match_dense(attention):
    """Packed, padded rows through the whole model, with a block smaller than a segment."""
    v0, l0, g0, state = _loss_and_grads(CFG)
    v1, l1, g1, _ = _loss_and_grads(CFG.replace(attention=attention, attention_block=8), params_from=state)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-4)
    _assert_trees_close(g1, g0, atol=1e-5)


def test_layers_are_stacked_and_the_program_does_not_grow_with_depth():
    def program_size(n_layers):
        model = Decoder(CFG.replace(n_layers=n_layers), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        assert model.layers.mlp.up.get_value().shape == (n_layers, 32, 64)
        f = jax.jit(jax.grad(lambda s, t: jnp.sum(nnx.merge(graphdef, s)(t))))
        return len(f.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text())

    small, deep = program_size(2), program_size(16)
    assert abs(deep - small) / small < 0.05, (small, deep)


@pytest.mark.parametrize("param_dtype, moves", [("float32", True), ("bfloat16", False)])
def test_tiny_learning_rate_moves_float32_master_weights_only(param_dtype, moves):
    """An Adam step at lr 1e-6 moves each weight by ~1e-6: kept by float32 master weights,
    rounded away by bfloat16 storage (its ulp at 0.02 is ~1.2e-4). Compute is bfloat16 in both."""
    cfg = CFG.replace(param_dtype=param_dtype, dtype="bfloat16")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(_batch()[0])
    params = {"policy": state, "critic": None}
    tx = make_optimizer(OptimSection(lr=1e-6, critic_lr=1e-6), total_steps=10)
    opt_state = tx.init(params)

    def loss(p):
        return -jnp.mean(token_logprobs(nnx.merge(graphdef, p["policy"])(tokens), tokens))

    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    before = np.asarray(params["policy"]["layers"]["mlp"]["up"].get_value(), np.float64)
    after = np.asarray(new["policy"]["layers"]["mlp"]["up"].get_value(), np.float64)
    assert new["policy"]["layers"]["mlp"]["up"].get_value().dtype == jnp.dtype(param_dtype)
    delta = np.abs(after - before)
    if moves:  # Adam's first step is lr * g / (|g| + eps): ~lr wherever the gradient is not tiny
        assert np.median(delta) == pytest.approx(1e-6, rel=0.05)
    else:  # only weights very close to zero (small ulps) can move
        assert np.mean(delta == 0) > 0.95
