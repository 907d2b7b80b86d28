"""Train-step benchmark: forward + backward + optax AdamW update of the decoder on next-token NLL.

Reports tokens/s, achieved FLOP/s as a fraction of a matmul peak timed in the same rounds, and
the same step in transformers PyTorch (same config, when torch is installed).
Prints a table and writes benchmarks/out/train_step_<preset>_<dtype>.json.
    .venv/bin/python benchmarks/train_step.py [--quick] [--dtype bfloat16] [--preset qwen3_0_6b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from steppo_jax.models import Decoder, ModelConfig, save_hf_checkpoint, token_logprobs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_chain(dtype, n: int):
    """(run, flops): a jitted chain of 8 dependent n x n matmuls, the peak reference."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype) / np.sqrt(n)

    @jax.jit
    def chain(x):
        for _ in range(8):
            x = x @ a
        return x

    run = lambda: chain(a).block_until_ready()  # noqa: E731
    run()
    return run, 8 * 2 * n ** 3


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step: 6 * matmul params * tokens + attention (QK^T and PV over the
    full T x T, as computed), times 3 for forward + backward."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.mlp_dim
    matmul_params = cfg.n_layers * per_layer + d * cfg.vocab_size
    tokens = batch * seq
    attention = 3 * cfg.n_layers * 4 * batch * seq * seq * cfg.n_heads * hd
    return 6 * matmul_params * tokens + attention


def jax_steps(cfg, batch, seq):
    """Two ways to run the step: "fused" (grad + update in one donated program) and "split"
    (a grad program, then an update program). Returns {name: run()} (compiled and warm)."""
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens)
        return -jnp.mean(token_logprobs(logits, tokens)[:, 1:])

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def fused(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        return *update(grads, opt_state, params), loss

    fused = jax.jit(fused, donate_argnums=(0, 1))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    update_fn = jax.jit(update, donate_argnums=(1, 2))
    state = [params, tx.init(params)]

    def run_fused():
        state[0], state[1], loss = fused(state[0], state[1], tokens)
        loss.block_until_ready()

    def run_split():
        loss, grads = grad_fn(state[0], tokens)
        state[0], state[1] = update_fn(grads, state[1], state[0])
        jax.block_until_ready(state[0])

    run_fused(), run_split()
    return {"fused": run_fused, "split": run_split}


def torch_step(cfg, batch, seq):
    """The same step in transformers PyTorch from the same initial weights, as a warm run()
    (None without torch)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(Decoder(cfg, rngs=nnx.Rngs(0)), d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)))

    def run():
        opt.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    run()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="d512", choices=["d512", "qwen3_0_6b"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if args.preset == "qwen3_0_6b":
        cfg = ModelConfig.qwen3_0_6b(param_dtype=args.dtype, dtype=args.dtype)
    else:
        cfg = ModelConfig(model_type="llama", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                          n_kv_heads=4, head_dim=64, mlp_dim=1536,
                          param_dtype=args.dtype, dtype=args.dtype)
    if args.quick:
        cfg = cfg.replace(n_layers=2)
    reps = 2 if args.quick else 5
    b, t = args.batch, args.seq

    n = 1024 if args.quick else (8192 if jax.default_backend() == "gpu" else 2048)
    peak_run, peak_flops = matmul_chain(cfg.jnp_dtype, n)
    runs = {"peak": peak_run, **jax_steps(cfg, b, t)}
    if not args.no_torch and (torch_run := torch_step(cfg, b, t)):
        runs["torch"] = torch_run
    # Rounds interleave every measurement, so each round's ratios see the same machine load.
    rounds = [{name: timed(run) for name, run in runs.items()} for _ in range(reps)]
    flops = step_flops(cfg, b, t)
    for r in rounds:
        r["step"] = min(r["fused"], r["split"])
        r["mfu"] = flops / r["step"] / (peak_flops / r["peak"])
        if "torch" in r:
            r["speedup_vs_torch"] = r["torch"] / r["step"]
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}

    result = dict(config=cfg.__dict__ | {"params": cfg.num_params()}, batch=b, seq=t,
                  backend=jax.default_backend(), device=str(jax.devices()[0]),
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  step_flops=flops, matmul_peak_flops=peak_flops / med["peak"],
                  tokens_per_s=b * t / med["step"], median=med, rounds=rounds)
    print(f"\ntrain step ({jax.default_backend()}, {cfg.num_params() / 1e6:.1f}M params, "
          f"{cfg.dtype}, B={b} T={t}); medians over {reps} interleaved rounds")
    rows = [("matmul peak GFLOP/s", peak_flops / med["peak"] / 1e9),
            ("step time, fused grad+update (s)", med["fused"]),
            ("step time, grad then update (s)", med["split"]),
            ("tokens/s", b * t / med["step"]), ("achieved GFLOP/s", flops / med["step"] / 1e9),
            ("MFU vs same-round matmul peak", med["mfu"])]
    if "torch" in med:
        rows += [("torch step time (s)", med["torch"]), ("torch tokens/s", b * t / med["torch"]),
                 ("speedup steppo / torch", med["speedup_vs_torch"])]
    for name, v in rows:
        print(f"{name:<36}{v:>14.3f}")
    out_dir = os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train_step_{args.preset}_{args.dtype}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
