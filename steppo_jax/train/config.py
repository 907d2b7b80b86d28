"""Typed, validated run configuration: YAML in ``configs/``, ``a.b=c`` overrides on top.

One frozen dataclass per section. Loading walks the dataclass fields and their type hints, so
a new field needs no new parsing code; a bad key or value raises ``ConfigError`` naming the full
field path and what is allowed::

    cfg = load_config("configs/default.yaml", ["algo.estimator=grpo", "rollout.group_size=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import yaml

from steppo_jax.train.storage import write_atomic


class ConfigError(ValueError):
    """A configuration key, value, override or file is invalid."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float: PyYAML follows YAML 1.1, where a float
    needs a dot (``1.0e-6``), and learning rates are written without one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_load(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass(frozen=True)
class ModelSection:
    """The policy (and critic) model: the tiny built-in decoder or an HF checkpoint."""

    source: Literal["tiny", "hf"] = "tiny"
    """``tiny``: the small decoder built from the sizes below; ``hf``: load ``hf_path``."""
    hf_path: str | None = None
    """Hugging Face checkpoint: a local directory, or a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``
    fetched into the HF cache (required when ``source`` is ``hf``)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; None = the shipped tiny tokenizer (or ``hf_path``'s for ``hf``)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the trained parameters and so of Adam's moments. Keep float32 (master
    weights) for real runs: at lr 1e-6 an update is far below half a bfloat16 ulp of a weight
    and would round away."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Activation and matmul dtype; weights are cast to it at use (norms, softmax, log-probs
    stay float32). The frozen reference policy and the sampler's copy are stored in it."""
    attention: Literal["auto", "dense", "chunked", "splash", "cudnn"] = "auto"
    """Attention kernel: ``dense`` materialises [T, T] scores; ``chunked`` (online softmax over
    key blocks, any backend), ``splash`` (Pallas, TPU), ``cudnn`` (GPU) never do; ``auto``
    picks per backend."""
    attention_block: int = 512
    """Key block of ``chunked`` attention (tokens)."""
    remat: Literal["none", "full", "save_dots"] = "none"
    """Recompute each decoder block in the backward pass: ``full`` keeps only the block inputs,
    ``save_dots`` also keeps the projections' outputs (less recompute, more memory)."""
    d_model: int = 128
    """Tiny model: residual width."""
    n_layers: int = 2
    """Tiny model: decoder layers."""
    n_heads: int = 4
    """Tiny model: query heads (must divide ``d_model``)."""
    n_kv_heads: int = 2
    """Tiny model: key/value heads (must divide ``n_heads``)."""
    d_ff: int = 384
    """Tiny model: MLP hidden width."""
    critic: Literal["separate", "shared"] = "separate"
    """``separate``: a second decoder with a value head; ``shared``: a value head on the policy trunk."""
    warm_start: str | None = None
    """Path of an SFT checkpoint to start the policy from (None = no warm start)."""

    @property
    def tokenizer_path(self) -> str | None:
        """Where the tokenizer is read: ``tokenizer``, else ``hf_path`` for an HF model, else
        None (the shipped tiny tokenizer)."""
        return self.tokenizer or (self.hf_path if self.source == "hf" else None)


@dataclass(frozen=True)
class EnvSection:
    """The environment the agent is trained and evaluated on."""

    name: str = "multihop_qa"
    """Registered environment name (``steppo_jax.envs.registered()``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to ``steppo_jax.envs.make``."""
    max_steps: int = 4
    """Steps per episode before truncation (S of the step tensors)."""
    eval_tasks: int = 64
    """Held-out tasks per evaluation: the first ``eval_tasks`` ids of the held-out split."""
    train_tasks: int | None = None
    """Distinct training tasks: ids ``0 .. train_tasks - 1``. null = the environment's whole
    training split where its tasks come from a finite source (hotpotqa: every question of
    ``env.options.path``, held out: ``env.options.eval_path``), else 10,000 generated tasks.
    A generated environment's held-out tasks are the ids right after the training ids."""
    step_timeout_s: float = 10.0
    """Seconds one environment step may take before it counts as a failure."""
    pool: Literal["thread", "process"] = "thread"
    """Where environments run: ``thread``: in this process, on ``workers`` threads; ``process``:
    each built in one of ``workers`` worker processes (``steppo_jax.envs.ProcessEnvs``), for
    CPU-bound environments that would serialise on the GIL. Same timeouts and failure isolation."""
    workers: int = 8
    """Threads (``pool: thread``) or worker processes (``pool: process``) running environment calls."""
    max_invalid_calls: int = 3
    """Consecutive malformed replies that truncate an episode (0 = never)."""


@dataclass(frozen=True)
class RolloutSection:
    """Sampling trajectories: batch shape, lengths, sampling filters and row layout."""

    group_size: int = 4
    """Rollouts per task (the group of GRPO/RLOO/GiGPO)."""
    tasks_per_iter: int = 8
    """Tasks per iteration; the batch holds ``tasks_per_iter * group_size`` trajectories."""
    max_new_tokens: int = 48
    """Tokens one step's response may have."""
    max_context: int = 512
    """Tokens of a whole row (prompt, responses and observations)."""
    temperature: float = 1.0
    """Sampling temperature (> 0; evaluation is greedy)."""
    top_p: float = 1.0
    """Nucleus filter in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Top-k filter; 0 disables it."""
    prefill_chunk: int = 1024
    """Prompt tokens the sampler prefills per pass: long prompts are prefilled a chunk at a
    time, so their activations stay [rows, prefill_chunk, ...], and every prompt longer than
    a chunk runs one compiled program (as many passes as it needs)."""
    layout: Literal["packed", "step_rows"] = "packed"
    """``packed``: one row per trajectory; ``step_rows``: one row per (trajectory, step)."""
    history_window: int | None = None
    """Rebuild each step's prompt from the opening messages and the last ``history_window``
    exchanges (an assistant reply and the environment's answer), rendered afresh by the chat
    template; null: the context grows by each reply and observation. Needs ``step_rows``."""
    pack_step_rows: bool = True
    """``step_rows`` layout: pack several short step rows into one row (first-fit decreasing,
    segment-aware attention) instead of one step per row; ignored by ``packed``."""
    engine: Literal["sync", "slots"] = "sync"
    """``sync``: each round decodes one reply of every live trajectory, then every environment
    steps; ``slots``: continuous batching (``steppo_jax.rollout.SlotEngine``): decode slots
    refilled between chunks of ``decode_chunk`` tokens, environments stepping while other
    slots decode. Greedy decoding gives the same trajectories either way."""
    decode_chunk: int = 8
    """``slots``: tokens each slot decodes per sampler call (between two refills); at most
    ``max_new_tokens``."""
    max_staleness: int = 0
    """Asynchronous training: 0 = rollout, then update, in turn; k >= 1 = the rollouts of the
    next k iterations run (in a background thread) while the current update does, with the
    newest weights at each sampler call. Every step carries the policy version that sampled
    it; the loss corrects for it step by step (behaviour = the sampler's log-probs, proximal
    policy = pi_old recomputed at update time, weight capped by ``algo.behavior_weight_cap``,
    which must be set), and steps more than k versions old are dropped from the policy loss
    (counted in ``rollout/dropped_stale``). One process only; a resumed run restarts the
    rollouts in flight."""
    slots: int = 0
    """``slots``: slots of the sampler, each holding one trajectory's KV cache of
    ``max_context`` tokens for its episode; 0 = one per trajectory of the batch. With fewer
    slots than trajectories, new trajectories wait for a slot whose episode has ended."""
    decode_rows: int = 0
    """``slots``: replies decoded at once (each sampler call reads and writes its busy
    slots' rows of the cache in place); 0 = every slot. Fewer rows than slots keep the rows
    busy while trajectories wait on their environments, their caches parked in their slots;
    a call costs its busy rows. Needs the sampler's batch on one device (a sample mesh whose
    data x fsdp is 1)."""
    decode_widths: int = 16
    """``slots``: compiled decode widths: a call decodes its busy slots rounded up to a
    multiple of ``decode_rows / decode_widths`` rows, and ends once that many rows have
    finished their replies. More widths pad less, at more compiled programs (each width
    once per attention span)."""


@dataclass(frozen=True)
class AlgoSection:
    """Credit assignment (estimator) and the PPO-style losses."""

    estimator: Literal["step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "gigpo"] = "step_gae"
    """Advantage estimator (``steppo_jax.ESTIMATORS``); StepPO is ``step_gae``."""
    gamma: float = 1.0
    """Discount per step (per token for ``token_gae``), in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]."""
    whiten: bool = True
    """Whiten GAE advantages over the batch."""
    whiten_std_floor: float = 0.0
    """Whitening divides by max(std, this): a batch whose GAE advantages barely vary (no
    reward signal, only critic noise) keeps small advantages instead of unit-size ones."""
    scale_by_std: bool = True
    """Divide group-relative scores by the group std (False = Dr.GRPO)."""
    step_weight: float = 1.0
    """GiGPO: weight of the step-level (anchor group) advantage."""
    policy_loss: Literal["step", "token"] = "step"
    """``step``: StepPO step-ratio surrogate; ``token``: token-level PPO."""
    ratio: Literal["geometric", "product"] = "geometric"
    """Step ratio: geometric mean of token ratios (GSPO-style) or their exact product."""
    aggregation: Literal["token_mean", "step_mean_token_mean", "step_mean_token_sum"] = "step_mean_token_mean"
    """How token losses are averaged into the policy loss."""
    clip_low: float = 0.2
    """Lower clip range: ratios below ``1 - clip_low`` are clipped."""
    clip_high: float = 0.28
    """Upper clip range: ratios above ``1 + clip_high`` are clipped."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages: a step (token, for the token loss) with
    A < 0 loses at most -c*A; None disables it."""
    value_clip: float | None = 0.2
    """Value clipping around the old values; None disables it."""
    value_coef: float = 0.5
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    kl_coef: float = 0.0
    """Weight of the KL to the frozen reference (0 = no reference pass)."""
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (k3 is the low-variance one)."""
    kl_in_reward: bool = False
    """Fold the KL penalty into the step rewards instead of the loss."""
    behavior_logp: Literal["recomputed", "sampler"] = "recomputed"
    """pi_old of the ratios: ``recomputed`` by the trainer's forward before the update, or the
    ``sampler``'s log-probs (of the truncated distribution it drew from, after top-k/top-p)."""
    behavior_weight_cap: float = 0.0
    """Step-level truncated importance sampling: each step's policy loss is weighted by
    min(exp(mean over its tokens of log pi_old - log pi_sampler), cap), correcting for
    sampling from the sampler's distribution rather than the recomputed pi_old; 0 disables
    it. Needs ``behavior_logp: recomputed``."""


@dataclass(frozen=True)
class OptimSection:
    """Optimizers (AdamW for policy and critic), schedule and PPO epochs."""

    lr: float = 3e-4
    """Policy learning rate (peak, after warmup)."""
    critic_lr: float = 1e-3
    """Critic learning rate."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate decay after warmup, over all update steps."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 2
    """PPO epochs over each batch."""
    minibatches: int = 2
    """Minibatches per epoch (one optimizer step each)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    logprob_chunk: int = 512
    """Tokens per chunk of the log-prob and entropy computation: the LM head's logits exist
    for ``rows x logprob_chunk x vocab`` at a time, never for the whole sequence."""
    micro_batch_rows: int = 0
    """Rows per micro-batch of the scoring passes and the update, whose gradients are
    accumulated exactly (0 = whole batches); must divide a minibatch's rows and be a multiple
    of the devices on the batch axes (data x fsdp)."""


@dataclass(frozen=True)
class TrainSection:
    """The RL loop's length, checkpoint and evaluation cadence."""

    iterations: int = 30
    """RL iterations (rollout + update)."""
    checkpoint_every: int = 10
    """Save a checkpoint every N iterations (and at the end)."""
    eval_every: int = 10
    """Greedy evaluation on held-out tasks every N iterations (and before and after training)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted."""


@dataclass(frozen=True)
class SFTSection:
    """Behaviour-cloning warm start on (noisy) expert demonstrations."""

    steps: int = 300
    """Behaviour-cloning optimizer steps."""
    lr: float = 1e-3
    """SFT learning rate."""
    batch_size: int = 16
    """Demonstrations per SFT step."""
    num_demos: int = 512
    """Expert demonstrations generated from the environment."""
    noise: float = 0.3
    """Probability that a demonstration step is replaced by a random well-formed tool call."""
    mistake: float = 0.0
    """Probability that a demonstration step is the environment's characteristic mistake
    (``mistake_action``, e.g. answering multihop_qa after the first hop) where it has one: a
    systematic error of the cloned policy that RL has to fix."""
    init: str | None = None
    """Policy checkpoint to continue from (a ``steppo sft`` output or ``model.warm_start``-style
    directory); None = the model's fresh initialisation. Continuing from the shipped warm start
    teaches a task variant (e.g. longer chains) in far fewer steps than cloning from scratch."""
    seed_offset: int = 1_000_000
    """Demonstration task ids start here, away from training ids and never on held-out ones (an
    environment with its own split, e.g. hotpotqa: its training ids from this position on)."""


@dataclass(frozen=True)
class MeshSection:
    """The device mesh (data, fsdp, tensor); see ``steppo_jax.sharding``."""

    data: int = -1
    """Data-parallel axis size; -1 = all devices left after ``fsdp`` and ``tensor``."""
    fsdp: int = 1
    """Parameter-sharding (FSDP) axis size."""
    tensor: int = 1
    """Tensor-parallel axis size."""
    axis_types: Literal["explicit", "auto"] = "explicit"
    """Mesh axis types (``jax.sharding.AxisType``)."""


@dataclass(frozen=True)
class Config:
    """A whole run: top-level settings and one section per concern."""

    seed: int = 0
    """Seed of every random stream of the run."""
    run_dir: str = "runs/default"
    """Directory for config.yaml, metrics, plots, checkpoints and summary.json: a local path or a
    URI such as ``gs://bucket/runs/x`` (shared by every host of a multi-host run)."""
    model: ModelSection = field(default_factory=ModelSection)
    env: EnvSection = field(default_factory=EnvSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    mesh: MeshSection = field(default_factory=MeshSection)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp) or tp
    return "a mapping" if origin is dict else origin.__name__


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked against the type hint ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        if any(type(value) is type(c) and value == c for c in typing.get_args(tp)):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; choose {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(option, value, path)
                except ConfigError:
                    pass
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif (origin or tp) is dict and isinstance(value, Mapping):
        return dict(value)
    elif tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, defaults for the keys it lacks.

    An empty section (``model:`` with nothing under it, read as None) means all defaults.
    """
    where = path or "config"
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, "
                          f"got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r}; valid keys of {where}: {', '.join(names)}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _get(cfg: Config, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


_AT_LEAST_ONE = (
    "model.d_model", "model.attention_block", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "env.max_steps", "env.eval_tasks", "env.workers", "rollout.group_size", "rollout.tasks_per_iter",
    "rollout.max_new_tokens", "rollout.max_context", "rollout.prefill_chunk", "rollout.decode_chunk", "rollout.decode_widths", "optim.epochs", "optim.minibatches", "optim.logprob_chunk",
    "train.checkpoint_every", "train.eval_every", "train.keep_checkpoints",
    "sft.batch_size", "sft.num_demos", "mesh.fsdp", "mesh.tensor",
)
_NON_NEGATIVE = (
    "seed", "env.max_invalid_calls", "rollout.top_k", "rollout.slots", "rollout.decode_rows", "rollout.max_staleness",
    "algo.step_weight",
    "algo.whiten_std_floor",
    "algo.value_coef", "algo.entropy_coef", "algo.kl_coef", "optim.warmup_steps", "optim.micro_batch_rows",
    "optim.weight_decay", "train.iterations", "sft.steps", "sft.seed_offset",
)
_POSITIVE = (
    "env.step_timeout_s", "rollout.temperature", "algo.clip_low", "algo.clip_high", "optim.lr",
    "optim.critic_lr", "optim.grad_clip", "sft.lr",
)
_UNIT_INTERVAL = ("algo.gamma", "algo.lam", "sft.noise", "sft.mistake")
_GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "gigpo")


def _rules(cfg: Config):
    """(field path, broken, what is required) for each rule that spans values or fields."""
    for p in _AT_LEAST_ONE:
        yield p, _get(cfg, p) < 1, "must be >= 1"
    for p in _NON_NEGATIVE:
        yield p, _get(cfg, p) < 0, "must be >= 0"
    for p in _POSITIVE:
        yield p, _get(cfg, p) <= 0, "must be > 0"
    for p in _UNIT_INTERVAL:
        yield p, not 0 <= _get(cfg, p) <= 1, "must be in [0, 1]"
    m, r, a, o = cfg.model, cfg.rollout, cfg.algo, cfg.optim
    yield "rollout.top_p", not 0 < r.top_p <= 1, "must be in (0, 1]"
    yield "optim.b1", not 0 <= o.b1 < 1, "must be in [0, 1)"
    yield "optim.b2", not 0 <= o.b2 < 1, "must be in [0, 1)"
    yield "algo.dual_clip", a.dual_clip is not None and a.dual_clip <= 1, "must be > 1 or null"
    yield "algo.value_clip", a.value_clip is not None and a.value_clip <= 0, "must be > 0 or null"
    yield ("env.train_tasks", cfg.env.train_tasks is not None and cfg.env.train_tasks < r.tasks_per_iter,
           f"must be >= rollout.tasks_per_iter ({r.tasks_per_iter}): one iteration draws that many distinct tasks")
    yield ("algo.behavior_weight_cap", a.behavior_weight_cap != 0 and a.behavior_weight_cap < 1,
           "must be 0 (off) or >= 1")
    yield ("algo.behavior_weight_cap", a.behavior_weight_cap != 0 and a.behavior_logp != "recomputed",
           "needs algo.behavior_logp 'recomputed' (with the sampler's log-probs as pi_old the ratio "
           "already corrects for the sampler)")
    yield "mesh.data", cfg.mesh.data == 0 or cfg.mesh.data < -1, "must be >= 1, or -1 for all remaining devices"
    yield "model.hf_path", m.source == "hf" and not m.hf_path, "is required when model.source is 'hf'"
    yield "model.n_heads", m.source == "tiny" and m.d_model % m.n_heads != 0, "must divide model.d_model"
    yield "model.n_kv_heads", m.source == "tiny" and m.n_heads % m.n_kv_heads != 0, "must divide model.n_heads"
    yield ("rollout.max_new_tokens", r.max_new_tokens >= r.max_context,
           "must be smaller than rollout.max_context")
    yield ("rollout.decode_chunk", r.decode_chunk > r.max_new_tokens,
           f"must be <= rollout.max_new_tokens ({r.max_new_tokens}): a chunk draws at most one reply's tokens")
    yield ("rollout.decode_rows", r.slots and r.decode_rows > r.slots,
           f"must be <= rollout.slots ({r.slots}): a call decodes at most every slot")
    yield ("rollout.max_staleness", r.max_staleness > 0 and not a.behavior_weight_cap,
           "needs algo.behavior_weight_cap >= 1 (the capped step-level importance weight of off-policy steps)")
    yield ("rollout.layout", a.estimator == "token_gae" and r.layout != "packed",
           "must be 'packed' for algo.estimator 'token_gae' (its recursion runs across the steps of one row)")
    yield ("rollout.history_window", r.history_window is not None and r.history_window < 0, "must be >= 0 or null")
    yield ("rollout.history_window", r.history_window is not None and r.layout != "step_rows",
           "needs rollout.layout 'step_rows' (a rebuilt prompt does not extend the previous step's row)")
    yield ("rollout.group_size", a.estimator in _GROUP_ESTIMATORS and r.group_size < 2,
           f"must be >= 2 for algo.estimator {a.estimator!r} (advantages are relative within a group)")
    yield ("optim.minibatches", o.minibatches > r.tasks_per_iter * r.group_size,
           "must be <= rollout.tasks_per_iter * rollout.group_size (trajectories per batch)")
    rows = r.tasks_per_iter * r.group_size // o.minibatches  # of a packed minibatch (per-step rows vary)
    yield ("optim.micro_batch_rows", r.layout == "packed" and o.micro_batch_rows > 0 and rows % o.micro_batch_rows != 0,
           f"must divide the {rows} rows of a minibatch (trajectories per batch / optim.minibatches)")


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A validated ``Config`` from a nested mapping; absent keys take their defaults."""
    cfg = _build(Config, d, "")
    for path, broken, required in _rules(cfg):
        if broken:
            raise ConfigError(f"{path} = {_get(cfg, path)!r} {required}")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested plain-dict form of ``cfg`` (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _apply_override(d: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like 'section.field=value', "
                          "e.g. 'algo.estimator=grpo'")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from None
    *parents, leaf = key.split(".")
    node = d
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[:i + 1])} is not a section")
        node = child
    node[leaf] = value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The YAML file at ``path`` (or the defaults), then ``a.b=c`` overrides, validated.

    Override values are parsed as YAML: ``rollout.group_size=8``, ``algo.dual_clip=null``,
    ``env.options={difficulty: 2}``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: malformed YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a sequence of 'a.b=c' strings, not one string")
    for override in overrides:
        _apply_override(data, override)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        if path is None:
            raise
        source = f"{path} with overrides" if overrides else path
        raise ConfigError(f"{source}: {err}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes ``cfg`` as YAML (loadable by ``load_config``) to a local path or a URI."""
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
