"""NNX Llama3 / Qwen2 / Qwen3 decoders, value heads, log-probs and HF checkpoint I/O."""

from steppo_jax.models.config import ModelConfig
from steppo_jax.models.decoder import Critic, Decoder, ValueHead, create_sharded, default_positions
from steppo_jax.models.hf import load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from steppo_jax.models.logprobs import token_logprobs, token_logprobs_and_entropy

__all__ = [
    "Critic",
    "Decoder",
    "ModelConfig",
    "ValueHead",
    "create_sharded",
    "default_positions",
    "load_hf_checkpoint",
    "read_hf_config",
    "save_hf_checkpoint",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
