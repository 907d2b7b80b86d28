"""Sampler benchmarks (CPU or GPU); baselines measured in the same run.

1. decode with the KV cache vs recomputing the whole sequence each step (no cache);
2. 8-turn conversations: continuing each row's cache vs re-prefilling the whole history per turn;
3. vs transformers PyTorch `generate` (greedy, same config and weights), when torch is installed.

Prints a table and writes benchmarks/out/sampler.json.
    .venv/bin/python benchmarks/sampler.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import best_time
from steppo_jax.models import Decoder, ModelConfig, save_hf_checkpoint
from steppo_jax.sampling import Sampler, SamplingParams


def no_cache_decoder(graphdef, prompt_len: int, new: int):
    """Greedy decode that reruns the full forward over the [B, prompt+new] buffer every step."""

    @jax.jit
    def run(params, prompt):
        model = nnx.merge(graphdef, params)
        buf = jnp.zeros((prompt.shape[0], prompt_len + new), jnp.int32).at[:, :prompt_len].set(prompt)

        def body(i, buf):
            logits = model(buf)
            tok = jnp.argmax(logits[:, prompt_len + i - 1], axis=-1).astype(jnp.int32)
            return buf.at[:, prompt_len + i].set(tok)

        return jax.lax.fori_loop(0, new, body, buf)[:, prompt_len:]

    return run


def bench_cache(model, cfg, batch, prompt_len, new, repeats):
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    sampler = Sampler(model, batch_size=batch, capacity=prompt_len + new + 64, max_new_tokens=new,
                      sampling=SamplingParams(greedy=True))
    cached = lambda: sampler.step(prompts, [], jax.random.key(0), reset=True)  # noqa: E731
    out = cached()
    t_cache = best_time(cached, repeats)

    graphdef, params = nnx.split(model)
    run = no_cache_decoder(graphdef, prompt_len, new)
    arr = jnp.asarray(prompts, jnp.int32)
    ref = np.asarray(run(params, arr))
    agree = float(np.mean(ref == np.asarray(out.tokens)))
    t_nocache = best_time(lambda: run(params, arr).block_until_ready(), max(1, repeats // 2))
    toks = batch * new
    return dict(batch=batch, prompt=prompt_len, new_tokens=new,
                cache_tok_s=toks / t_cache, no_cache_tok_s=toks / t_nocache,
                speedup=t_nocache / t_cache, greedy_token_agreement=agree), out.tokens, prompts


def bench_multiturn(model, cfg, batch, turns, obs_len, new, repeats):
    rng = np.random.default_rng(1)
    first = rng.integers(0, cfg.vocab_size, (batch, 32)).tolist()
    obs = rng.integers(0, cfg.vocab_size, (turns, batch, obs_len)).tolist()
    capacity = 32 + turns * (obs_len + new) + 64
    kw = dict(batch_size=batch, capacity=capacity, max_new_tokens=new,
              sampling=SamplingParams(greedy=True))
    cont, fresh = Sampler(model, **kw), Sampler(model, **kw)

    def continued():
        new_tokens = first
        for t in range(turns):
            out = cont.step(new_tokens, [], jax.random.key(t), reset=t == 0)
            new_tokens = obs[t]
        return out

    def reprefilled():
        history = [list(p) for p in first]
        for t in range(turns):
            out = fresh.step(history, [], jax.random.key(t), reset=True)
            history = [h + o + x for h, o, x in zip(history, out.tokens, obs[t])]
        return out

    a, b = continued(), reprefilled()  # compile every bucket once
    t_cont = best_time(continued, repeats)
    t_re = best_time(reprefilled, repeats)
    return dict(batch=batch, turns=turns, obs_tokens=obs_len, new_tokens_per_turn=new,
                continue_s=t_cont, reprefill_s=t_re, speedup=t_re / t_cont,
                same_tokens=a.tokens == b.tokens)


def bench_torch(model, cfg, prompts, new, jax_tokens, jax_tok_s, repeats):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
              pad_token_id=0, attention_mask=torch.ones_like(ids))

    def gen():
        with torch.no_grad():
            return hf.generate(ids, **kw)

    out = gen()[:, ids.shape[1]:].numpy()
    t = best_time(gen, repeats)
    tok_s = ids.numel() // ids.shape[1] * new / t
    return dict(torch_generate_tok_s=tok_s, steppo_tok_s=jax_tok_s, speedup=jax_tok_s / tok_s,
                greedy_token_agreement=float(np.mean(out == np.asarray(jax_tokens))),
                torch_threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat (smoke test)")
    args = ap.parse_args()
    cfg = ModelConfig(model_type="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4,
                      n_kv_heads=2, head_dim=64, mlp_dim=768, max_position_embeddings=4096)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    reps = 1 if args.quick else 3
    new = 32 if args.quick else 256

    decode, tokens, prompts = bench_cache(model, cfg, batch=4, prompt_len=32, new=new, repeats=reps)
    multiturn = bench_multiturn(model, cfg, batch=4, turns=8, obs_len=24,
                                new=8 if args.quick else 32, repeats=reps)
    torch_cmp = bench_torch(model, cfg, prompts, new, tokens, decode["cache_tok_s"], reps)

    result = dict(config=cfg.__dict__ | {"params": cfg.num_params()}, device=str(jax.devices()[0]),
                  backend=jax.default_backend(), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), decode=decode, multiturn=multiturn, vs_torch=torch_cmp)
    print(f"\nsampler benchmark  ({jax.default_backend()}, {cfg.num_params() / 1e6:.1f}M params, f32)")
    print(f"{'what':<44}{'value':>14}")
    rows = [
        (f"decode tok/s, KV cache (B=4, {new} new)", decode["cache_tok_s"]),
        ("decode tok/s, no cache (full recompute)", decode["no_cache_tok_s"]),
        ("  speedup cache / no cache", decode["speedup"]),
        ("8-turn: continue cache (s)", multiturn["continue_s"]),
        ("8-turn: re-prefill history (s)", multiturn["reprefill_s"]),
        ("  speedup continue / re-prefill", multiturn["speedup"]),
    ]
    if torch_cmp:
        rows += [("torch generate tok/s (same weights)", torch_cmp["torch_generate_tok_s"]),
                 ("  speedup steppo / torch", torch_cmp["speedup"])]
    for name, v in rows:
        print(f"{name:<44}{v:>14.2f}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "out", "sampler.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
