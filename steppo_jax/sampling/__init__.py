"""Jitted prefill + `lax.while_loop` decode with a per-row KV cache kept across agent steps."""

from steppo_jax.sampling.generate import DecodeState, Generation, generate, init_state, jit_generate
from steppo_jax.sampling.sampler import Sampler, SlotShapes, StepOutput, bucket, reply_keys
from steppo_jax.sampling.select import SamplingParams, select_tokens

__all__ = [
    "DecodeState",
    "Generation",
    "Sampler",
    "SamplingParams",
    "SlotShapes",
    "StepOutput",
    "bucket",
    "generate",
    "init_state",
    "jit_generate",
    "reply_keys",
    "select_tokens",
]
