"""GPU decode throughput at a ~0.5B (Qwen3-0.6B-shaped, bf16, random weights) config.

Run by benchmarks/gpu_check.sh; prints a table and a markdown line for benchmarks/RESULTS.md and
writes benchmarks/out/gpu_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import jax
import numpy as np
from flax import nnx

from steppo_jax.models import Decoder, ModelConfig, create_sharded
from steppo_jax.sampling import Sampler, SamplingParams
from steppo_jax.sharding import make_mesh


def card_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(jax.devices()[0].device_kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny config: check the script on CPU")
    args = ap.parse_args()
    cfg = ModelConfig.tiny() if args.smoke else ModelConfig.qwen3_0_6b()
    mesh = make_mesh(data=1, fsdp=1, tensor=1)
    model = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    batch, prompt_len, new = (4, 16, 16) if args.smoke else (64, 128, 256)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    sampler = Sampler(model, batch_size=batch, capacity=1024, max_new_tokens=new,
                      sampling=SamplingParams(temperature=1.0, top_p=0.95), mesh=mesh)
    t0 = time.perf_counter()
    sampler.step(prompts, [], jax.random.key(0), reset=True)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        out = sampler.step(prompts, [], jax.random.key(i + 1), reset=True)
        times.append(time.perf_counter() - t0)
    generated = sum(len(t) for t in out.tokens)
    result = dict(card=card_name(), params=cfg.num_params(), batch=batch, prompt=prompt_len,
                  new_tokens=new, first_call_s=compile_s, step_s=min(times),
                  decode_tok_s=generated / min(times))
    print(f"\ndecode ({result['card']}, {cfg.num_params() / 1e6:.0f}M params {cfg.dtype}, B={batch}, "
          f"prompt {prompt_len}, {new} new, top-p 0.95)")
    print(f"{'tokens/s':<24}{result['decode_tok_s']:>12.0f}")
    print(f"{'first call (compile) s':<24}{compile_s:>12.1f}")
    out_dir = os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_decode.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"RESULTS.md: | {result['card']} | decode {cfg.num_params() / 1e6:.0f}M {cfg.dtype} B={batch} | "
          f"{result['decode_tok_s']:.0f} tok/s |")


if __name__ == "__main__":
    main()
