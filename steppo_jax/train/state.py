"""Models, mesh, optimizer and the train state of a run.

Parameters live in one pytree ``{"policy": ..., "critic": ...}`` updated by one optimizer
(``optax.multi_transform`` with a learning rate per group), so a critic on the policy's
trunk (``model.critic = "shared"``) and a separate critic share the same update code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from steppo_jax import sharding
from steppo_jax.estimators import get_estimator
from steppo_jax.models import (Critic, Decoder, ModelConfig, ValueHead, create_sharded, load_hf_checkpoint,
                               read_hf_config)
from steppo_jax.train.config import Config, ConfigError, OptimSection


@struct.dataclass
class TrainState:
    """params: {"policy": nnx.State, "critic": nnx.State | None}; opt_state: optax state."""

    params: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class Models:
    """Static halves of the models (graph definitions) and how the critic is wired.

    critic: "separate" (own trunk), "shared" (value head on the policy trunk) or None
    (the estimator needs no critic). critic_level: "step" or "token" values.
    """

    config: ModelConfig
    policy_def: Any
    critic_def: Any
    critic: str | None
    critic_level: str | None


def make_mesh(cfg: Config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of the config on ``devices`` (default: ``jax.devices()``;
    ``steppo plan`` passes a TPU topology's); data = -1 takes the remaining devices, a smaller
    explicit mesh uses the first devices."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    m = cfg.mesh
    data = m.data if m.data != -1 else n // (m.fsdp * m.tensor)
    size = data * m.fsdp * m.tensor
    if size > n or (m.data == -1 and size != n):
        raise ConfigError(f"mesh data={data} x fsdp={m.fsdp} x tensor={m.tensor} does not fit the {n} devices")
    return sharding.make_mesh(data, m.fsdp, m.tensor, explicit=m.axis_types == "explicit",
                              devices=devices[:size])


def model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    """The tiny model of ``cfg.model`` (source "tiny")."""
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not a multiple of model.n_heads={m.n_heads}")
    return ModelConfig.tiny(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                            n_kv_heads=m.n_kv_heads, head_dim=m.d_model // m.n_heads, mlp_dim=m.d_ff,
                            **kernel_options(cfg))


def kernel_options(cfg: Config) -> dict:
    """The ModelConfig fields that ``cfg.model`` sets for any model source: dtypes, attention
    kernel and rematerialisation."""
    m = cfg.model
    return dict(param_dtype=m.param_dtype, dtype=m.compute_dtype, attention=m.attention,
                attention_block=m.attention_block, remat=m.remat)


def _critic_maker(critic_kind: str | None, mc: ModelConfig, seed: int):
    """The critic's constructor for ``critic_kind`` (None: no critic)."""
    if critic_kind == "separate":
        return lambda: Critic(mc, rngs=nnx.Rngs(seed + 1))
    if critic_kind == "shared":
        return lambda: ValueHead(mc.d_model, rngs=nnx.Rngs(seed + 1))
    return None


def build_models(cfg: Config, vocab_size: int, mesh) -> tuple[Models, Any]:
    """(Models, params) with every parameter created in its sharding on ``mesh``."""
    estimator = get_estimator(cfg.algo.estimator)
    critic_kind = cfg.model.critic if estimator.critic else None
    if cfg.model.source == "hf":
        opts = kernel_options(cfg)
        policy, mc = load_hf_checkpoint(cfg.model.hf_path, opts.pop("param_dtype"),
                                        compute_dtype=opts.pop("dtype"), mesh=mesh, **opts)
        if policy.config.vocab_size < vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model only {policy.config.vocab_size}")
    else:
        mc = model_config(cfg, vocab_size)
        policy = create_sharded(lambda: Decoder(mc, rngs=nnx.Rngs(cfg.seed)), mesh)
    make_critic = _critic_maker(critic_kind, mc, cfg.seed)
    critic = create_sharded(make_critic, mesh) if make_critic is not None else None
    policy_def, policy_params = nnx.split(policy)
    critic_def, critic_params = nnx.split(critic) if critic is not None else (None, None)
    if critic_kind == "separate" and cfg.model.source == "hf":  # the checkpoint's trunk, read once
        critic_params = critic_from_policy(critic_params, policy_params)
    models = Models(mc, policy_def, critic_def, critic_kind, estimator.critic if critic_kind else None)
    return models, {"policy": policy_params, "critic": critic_params}


def abstract_models(cfg: Config, vocab_size: int, mesh) -> tuple[Models, Any]:
    """``build_models`` without weights: (Models, params as ``jax.ShapeDtypeStruct`` leaves that
    carry their shardings on ``mesh``). An HF model's shapes come from its config.json alone;
    ``vocab_size`` sizes the tiny model only."""
    estimator = get_estimator(cfg.algo.estimator)
    critic_kind = cfg.model.critic if estimator.critic else None
    if cfg.model.source == "hf":
        opts = kernel_options(cfg)
        mc = read_hf_config(cfg.model.hf_path, opts.pop("param_dtype"), compute_dtype=opts.pop("dtype"), **opts)
    else:
        mc = model_config(cfg, vocab_size)
    defs, params = {}, {}
    makers = {"policy": lambda: Decoder(mc, rngs=nnx.Rngs(cfg.seed)),
              "critic": _critic_maker(critic_kind, mc, cfg.seed)}
    for name, make in makers.items():
        defs[name], params[name] = None, None
        if make is not None:
            defs[name], state = nnx.split(nnx.eval_shape(make))
            params[name] = sharding.abstract_state(state, mesh)
    models = Models(mc, defs["policy"], defs["critic"], critic_kind, estimator.critic if critic_kind else None)
    return models, params


def _schedule(lr: float, optim: OptimSection, total_steps: int):
    warm = optim.warmup_steps
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1))
    else:
        main = optax.linear_schedule(lr, 0.0, max(total_steps - warm, 1))
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
    return main


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping per parameter group; updates whose gradients are not
    finite are skipped (the state is left as it was) by ``optax.apply_if_finite``."""

    def group(lr):
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                           optax.adamw(_schedule(lr, optim, total_steps), b1=optim.b1, b2=optim.b2,
                                       weight_decay=optim.weight_decay))

    def labels(params):
        return {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}

    multi = optax.multi_transform({"policy": group(optim.lr), "critic": group(optim.critic_lr)}, labels)
    return optax.apply_if_finite(multi, max_consecutive_errors=1_000_000)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    """A fresh TrainState; optimizer moments take the shardings of their parameters."""
    opt_state = jax.jit(tx.init)(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def copy_tree(tree, dtype=None):
    """A copy that owns its buffers (safe to keep while the original is donated); floating
    leaves cast to ``dtype`` if given (a frozen reference is kept in the compute dtype)."""
    def copy(x):  # astype to the same dtype would alias, so copy first
        return jnp.copy(x).astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)
    return jax.tree.map(copy, tree)


def critic_from_policy(critic_params, policy_params):
    """A separate critic whose trunk starts as a copy of the (warm-started) policy's trunk —
    as a critic initialised from the SFT model — and whose value head is kept."""
    for name in list(critic_params["trunk"].keys()):
        critic_params["trunk"][name] = copy_tree(policy_params[name])
    return critic_params
