"""Decoder semantics: packing with segment ids, padding, value heads, log-prob convention, config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from steppo_jax.models import (Critic, Decoder, ModelConfig, ValueHead, default_positions,
                               token_logprobs)

CFG = ModelConfig(model_type="llama", vocab_size=128, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


def test_packed_segments_equal_separate_rows(model):
    a, b, c = [5, 6, 7, 8], [9, 10, 11], [12, 13]
    packed = jnp.asarray([a + b + c + [0]])
    seg = jnp.asarray([[0] * 4 + [1] * 3 + [2] * 2 + [3]])
    np.testing.assert_array_equal(default_positions(packed, seg)[0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 0])
    out = np.asarray(model(packed, segment_ids=seg))[0]
    for row, lo in ((a, 0), (b, 4), (c, 7)):
        alone = np.asarray(model(jnp.asarray([row])))[0]
        np.testing.assert_allclose(out[lo:lo + len(row)], alone, atol=1e-5)


def test_right_padding_does_not_change_valid_positions(model):
    tokens = jnp.asarray([[3, 4, 5, 6, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]], bool)
    full = np.asarray(model(tokens, attention_mask=mask))[0, :4]
    alone = np.asarray(model(tokens[:, :4]))[0]
    np.testing.assert_allclose(full, alone, atol=1e-5)
    assert np.isfinite(np.asarray(model(tokens, attention_mask=mask))).all()


def test_token_logprobs_convention():
    logits = jnp.log(jnp.asarray([[[0.5, 0.5, 0.0 + 1e-30], [0.1, 0.2, 0.7], [1 / 3] * 3]]))
    tokens = jnp.asarray([[2, 1, 2]])
    lp = np.asarray(token_logprobs(logits, tokens))
    np.testing.assert_allclose(lp, [[0.0, np.log(0.5), np.log(0.7)]], rtol=1e-6)
    lp2 = np.asarray(token_logprobs(logits, tokens, temperature=2.0))
    p = np.sqrt([0.1, 0.2, 0.7]) / np.sqrt([0.1, 0.2, 0.7]).sum()
    np.testing.assert_allclose(lp2[0, 2], np.log(p[2]), rtol=1e-6)


def test_value_heads_shared_and_separate(model):
    tokens = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
    head = ValueHead(CFG.d_model, rngs=nnx.Rngs(1))
    v = head(model.hidden(tokens))
    assert v.shape == (2, 4) and v.dtype == jnp.float32
    critic = Critic(CFG, rngs=nnx.Rngs(2))
    assert not hasattr(critic.trunk, "lm_head")
    assert critic(tokens).shape == (2, 4)

    # the critic trains: a few steps reduce a regression loss
    opt = nnx.Optimizer(critic, optax.adam(1e-2), wrt=nnx.Param)
    target = jnp.asarray([[0.0, 1.0, 2.0, 3.0]] * 2)

    @nnx.jit
    def step(critic, opt):
        loss, grads = nnx.value_and_grad(lambda c: jnp.mean((c(tokens) - target) ** 2))(critic)
        opt.update(critic, grads)
        return loss

    losses = [float(step(critic, opt)) for _ in range(20)]
    assert losses[-1] < 0.2 * losses[0]


def test_bf16_params_and_compute():
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    m = Decoder(cfg, rngs=nnx.Rngs(0))
    ref = Decoder(CFG, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[1, 2, 3, 4, 5]])
    assert m.embed.get_value().dtype == jnp.bfloat16
    out = m(tokens)
    assert out.dtype == jnp.float32 and m.hidden(tokens).dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out - ref(tokens)))) < 0.05


def test_config_validation_and_hf_dict():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="rope_scaling type"):
        ModelConfig(rope_scaling=(("rope_type", "longrope"),))
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    tiny = ModelConfig.tiny(vocab_size=256)
    assert 5e5 < tiny.num_params() < 5e6
    assert ModelConfig.from_hf(tiny.to_hf()) == tiny
    old_style = {**CFG.to_hf(), "rope_scaling": {"type": "linear", "factor": 2.0}}
    old_style.pop("rope_parameters")
    assert ModelConfig.from_hf(old_style).rope_scaling == (("factor", 2.0), ("rope_type", "linear"))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(Decoder(tiny, rngs=nnx.Rngs(0))))) \
        == tiny.num_params()
