"""`ModelConfig`: the decoder's hyper-parameters, and their mapping to/from HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# HF `model_type` -> transformers class name written into `config.json`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTENTION = ("auto", "dense", "chunked", "splash", "cudnn")
REMAT = ("none", "full", "save_dots")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama3 / Qwen2 / Qwen3 decoder.

    `rope_scaling` is HF's `rope_parameters` minus `rope_theta`, as sorted (key, value) pairs so
    the config stays hashable (it is a static argument of jitted functions). `param_dtype` is the
    storage dtype of the weights, `dtype` the compute dtype of activations; norms, softmax and
    logits are always computed in float32. `attention` names the kernel
    (`steppo_jax.models.attention`; `auto` picks per backend) and `attention_block` its key
    block; `remat` rematerialises each block in the backward pass (`none`, `full`, or
    `save_dots`: keep the projections' outputs).
    """

    model_type: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "none"

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {sorted(ARCHITECTURES)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION}")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT}")
        if self.attention_block < 1:
            raise ValueError(f"attention_block={self.attention_block} must be >= 1")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embeddings included, tied counted once)."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += hd * (self.n_heads + 2 * self.n_kv_heads) * self.qkv_bias + d * self.o_bias
        attn += 2 * hd * self.qk_norm
        mlp = 3 * d * self.mlp_dim + (2 * self.mlp_dim + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + emb + d

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides) -> "ModelConfig":
        """A ~1M parameter (at vocab 256) Qwen3-style model for tests and the CPU demo."""
        base = dict(model_type="qwen3", vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4,
                    n_kv_heads=2, head_dim=32, mlp_dim=512, qk_norm=True, tie_embeddings=True,
                    rope_theta=1_000_000.0)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen3_0_6b(cls, **overrides) -> "ModelConfig":
        """Qwen3-0.6B's shapes (random weights unless loaded)."""
        base = dict(model_type="qwen3", vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16,
                    n_kv_heads=8, head_dim=128, mlp_dim=3072, qk_norm=True, tie_embeddings=True,
                    rope_theta=1_000_000.0, max_position_embeddings=40_960,
                    param_dtype="bfloat16", dtype="bfloat16")
        return cls(**{**base, **overrides})

    # -- HF conversion -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any, *, param_dtype: str | None = None,
                dtype: str | None = None) -> "ModelConfig":
        """Builds a config from a transformers config object or a `config.json` dict.

        Accepts both the transformers<5 layout (`rope_theta` + `rope_scaling`) and the >=5 one
        (`rope_parameters`). Raises ValueError for an unsupported architecture or feature.
        """
        d = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                             f"(architectures={d.get('architectures')}); supported: {sorted(ARCHITECTURES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' is implemented")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10_000.0))
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        rope.pop("partial_rotary_factor", None)
        n_heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        qkv_bias = {"qwen2": True, "qwen3": d.get("attention_bias", False)}.get(
            model_type, d.get("attention_bias", False))
        o_bias = False if model_type == "qwen2" else d.get("attention_bias", False)
        torch_dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            mlp_dim=d["intermediate_size"],
            rms_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(qkv_bias),
            o_bias=bool(o_bias),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            param_dtype=param_dtype or str(torch_dtype),
            dtype=dtype or param_dtype or str(torch_dtype),
        )

    def to_hf(self) -> dict:
        """The `config.json` dict transformers reads back into the same architecture."""
        if self.model_type == "qwen2" and not (self.qkv_bias and not self.o_bias):
            raise ValueError("qwen2 requires qkv_bias=True and o_bias=False")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("q/k norm is present exactly in qwen3 models")
        if self.model_type != "llama" and self.mlp_bias:
            raise ValueError(f"{self.model_type} has no mlp_bias option")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("llama's attention_bias covers q/k/v and o together")
        if self.model_type == "qwen3" and self.qkv_bias != self.o_bias:
            raise ValueError("qwen3's attention_bias covers q/k/v and o together")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.mlp_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default",
                                **dict(self.rope_scaling)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "dtype": self.param_dtype,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out
