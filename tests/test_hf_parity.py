"""Logit parity with transformers' PyTorch models, and HF checkpoint round trips / errors."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from steppo_jax.models import ModelConfig, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from steppo_jax.models.hf import _read_header  # noqa: E402

BASE = dict(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=6, rms_norm_eps=1e-6, max_position_embeddings=256)

CASES = {
    "llama_gqa3": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "llama_mha_bias_tied": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_key_value_heads=6, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(num_key_value_heads=3, head_dim=16, rope_parameters=dict(
                        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(num_key_value_heads=1, rope_parameters=dict(
                              rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen2_tied_yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                        dict(num_key_value_heads=3, tie_word_embeddings=True, rope_parameters=dict(
                            rope_type="yarn", rope_theta=10000.0, factor=4.0,
                            original_max_position_embeddings=32))),
    "qwen3_qknorm_tied": ("Qwen3Config", "Qwen3ForCausalLM",
                          dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "qwen3_bias_untied": ("Qwen3Config", "Qwen3ForCausalLM",
                          dict(num_key_value_heads=1, head_dim=12, attention_bias=True)),
}


def _torch_model(case, seed=0):
    cfg_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, cfg_cls)(**BASE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # perturb every tensor so norms and biases are exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens, mask=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask, dtype=torch.long)
            kw["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
        return model(torch.tensor(tokens), **kw).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity(case, tmp_path):
    hf = _torch_model(case)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_checkpoint(str(tmp_path), dtype="float32")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _hf_logits(hf, tokens)
    assert np.max(np.abs(ours - ref)) <= 1e-4, np.max(np.abs(ours - ref))


def test_padding_mask_parity(tmp_path):
    hf = _torch_model("qwen3_qknorm_tied")
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_checkpoint(str(tmp_path), dtype="float32")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
    mask = np.ones((2, 24), np.int64)
    mask[1, :7] = 0  # left padding
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask, bool)))
    ref = _hf_logits(hf, tokens, mask)
    valid = mask.astype(bool)
    assert np.max(np.abs(ours[valid] - ref[valid])) <= 1e-4


def test_save_load_roundtrip_identical(tmp_path):
    hf = _torch_model("qwen2_bias")
    hf.save_pretrained(tmp_path / "a")
    model, _ = load_hf_checkpoint(str(tmp_path / "a"), dtype="float32")
    save_hf_checkpoint(model, str(tmp_path / "b"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))
    reloaded.save_pretrained(tmp_path / "c")
    model2, _ = load_hf_checkpoint(str(tmp_path / "c"), dtype="float32")
    save_hf_checkpoint(model2, str(tmp_path / "d"))
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    for d in ("b", "c", "d"):
        got = load_file(str(tmp_path / d / "model.safetensors"))
        assert set(got) == set(ref)
        for k, v in got.items():
            np.testing.assert_array_equal(v, ref[k], err_msg=f"{d}: {k}")


@pytest.mark.parametrize("case", ["llama3_rope", "qwen3_qknorm_tied"])
def test_saved_checkpoint_gives_same_logits_in_torch(case, tmp_path):
    hf = _torch_model(case)
    hf.save_pretrained(tmp_path / "a")
    model, cfg = load_hf_checkpoint(str(tmp_path / "a"), dtype="float32")
    save_hf_checkpoint(model, str(tmp_path / "b"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).float().eval()
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 30))
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(hf, tokens), atol=1e-6)
    assert ModelConfig.from_hf(reloaded.config) == cfg


def test_sharded_index_checkpoint(tmp_path):
    hf = _torch_model("llama_gqa3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, cfg = load_hf_checkpoint(str(tmp_path), dtype="float32")
    tokens = np.arange(20)[None] % cfg.vocab_size
    assert np.max(np.abs(np.asarray(model(jnp.asarray(tokens))) - _hf_logits(hf, tokens))) <= 1e-4


def test_bf16_load_and_save(tmp_path):
    hf = _torch_model("qwen3_qknorm_tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "a")
    model, cfg = load_hf_checkpoint(str(tmp_path / "a"))
    assert cfg.param_dtype == "bfloat16" and model.embed.get_value().dtype == jnp.bfloat16
    save_hf_checkpoint(model, str(tmp_path / "b"))
    header, _ = _read_header(str(tmp_path / "b" / "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    tokens = np.arange(16)[None]
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _hf_logits(hf.float(), tokens)
    assert np.max(np.abs(ours - ref)) < 0.1  # bf16 compute vs f32 reference


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(tmp_path / "empty"))
    hf = _torch_model("llama_gqa3")
    hf.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())

    bad = tmp_path / "arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        load_hf_checkpoint(str(bad))

    shape = tmp_path / "shape"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    os.symlink(tmp_path / "ok" / "model.safetensors", shape / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.[qk]_proj\.weight"):
        heads = tmp_path / "heads"
        heads.mkdir()
        (heads / "config.json").write_text(json.dumps({**cfg, "head_dim": 4}))
        os.symlink(tmp_path / "ok" / "model.safetensors", heads / "model.safetensors")
        load_hf_checkpoint(str(heads))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*\(\d+, \d+\)"):
        load_hf_checkpoint(str(shape))

    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(str(noweights))

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    os.symlink(tmp_path / "ok" / "model.safetensors", missing / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.2"):
        load_hf_checkpoint(str(missing))
