"""SFT warm start: behaviour cloning on (noisy) expert trajectories, loss on action tokens.

Demonstrations go through the same rollout loop as RL (a scripted sampler in place of the
model), so the cloned policy sees exactly the token layout it will be trained on.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from steppo_jax.models import token_logprobs
from steppo_jax.rollout import TrajectoryRecord, packed_batch
from steppo_jax.rollout.scripted import NoisyExpert, ScriptedSampler
from steppo_jax.train.metrics import progress
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.state import Models
from steppo_jax.train.tasks import demo_tasks


def collect_demos(runtime: Runtime, task_ids: list[int], *, noise: float, mistake: float = 0.0,
                  batch: int = 64) -> list[TrajectoryRecord]:
    """Demonstrations of tasks ``task_ids`` (failed ones dropped)."""
    cfg = runtime.cfg
    records: list[TrajectoryRecord] = []
    envs: list = []
    make = runtime.env_factory()

    def factory():
        envs.append(make())
        return envs[-1]

    for start in range(0, len(task_ids), batch):
        envs.clear()
        chunk = task_ids[start:start + batch]
        sampler = ScriptedSampler(runtime.tokenizer, len(chunk),
                                  NoisyExpert(envs, noise, seed=cfg.seed + chunk[0], mistake=mistake),
                                  max_new_tokens=cfg.rollout.max_new_tokens)
        engine = runtime.engine(sampler, factory, synchronous=True)
        records += engine.collect([(t, cfg.seed) for t in chunk], 1, jax.random.key(0))
    return [r for r in records if r.failed is None and r.num_steps > 0]


def _loss(models: Models, policy_params, tokens, step_ids):
    policy = nnx.merge(models.policy_def, policy_params)
    logp = token_logprobs(policy(tokens), tokens)
    mask = step_ids >= 0
    return -jnp.sum(jnp.where(mask, logp, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def run_sft(runtime: Runtime, models: Models, policy_params, *, log=print):
    """Clones the demonstrations into ``policy_params``; returns (params, metrics dict)."""
    with jax.set_mesh(runtime.mesh):
        return _run_sft(runtime, models, policy_params, log)


def _run_sft(runtime: Runtime, models: Models, policy_params, log):
    cfg = runtime.cfg
    s = cfg.sft
    t0 = time.perf_counter()
    tasks = demo_tasks(cfg.env, runtime.env_factory()(), s.seed_offset, s.num_demos)
    demos = collect_demos(runtime, tasks, noise=s.noise, mistake=s.mistake)
    if not demos:
        raise RuntimeError("SFT collected no usable demonstrations (every episode failed)")
    longest = max(len(r.tokens) for r in demos)
    batch = packed_batch(demos, cfg.env.max_steps, seq_len=-(-longest // 64) * 64)  # one shape for every step
    demo_success = float(np.mean([r.success for r in demos]))
    log(f"sft: {len(demos)} demonstrations ({demo_success:.0%} successful, noise {s.noise}, mistakes {s.mistake}), "
        f"{int(batch.action_mask.sum())} action tokens, collected in {time.perf_counter() - t0:.1f}s")
    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, s.lr, min(50, s.steps // 10 + 1), s.steps)))
    opt_state = jax.jit(tx.init)(policy_params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, step_ids):
        loss, grads = jax.value_and_grad(functools.partial(_loss, models))(params, tokens, step_ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    rows = len(demos)
    size = min(s.batch_size, rows)
    losses = []
    with progress(s.steps, "sft") as bar:
        for i in range(s.steps):
            idx = rng.choice(rows, size=size, replace=rows < size)
            tokens, step_ids = runtime.put((batch.tokens[idx], batch.step_ids[idx]))
            policy_params, opt_state, loss = step(policy_params, opt_state, tokens, step_ids)
            losses.append(loss)
            bar.update(1)
    losses = np.asarray(jax.device_get(losses))
    log(f"sft: loss {losses[0]:.3f} -> {losses[-10:].mean():.3f} over {s.steps} steps "
        f"({time.perf_counter() - t0:.1f}s)")
    return policy_params, {"sft_demos": len(demos), "sft_demo_success": demo_success,
                           "sft_loss_first": float(losses[0]), "sft_loss_last": float(losses[-10:].mean()),
                           "sft_seconds": time.perf_counter() - t0}
