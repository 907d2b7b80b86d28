"""What every job of a run needs on the host: mesh, tokenizer, environments, rollout engines."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from steppo_jax import envs
from steppo_jax.rollout import RolloutEngine, RolloutSettings, TrajectoryRecord, packed_batch, step_rows_batch
from steppo_jax.sampling import Sampler, SamplingParams
from steppo_jax.tokenizer import load_tokenizer
from steppo_jax.train.config import Config, ConfigError
from steppo_jax.train.state import make_mesh
from steppo_jax.types import StepBatch


@dataclasses.dataclass
class Runtime:
    cfg: Config
    mesh: jax.sharding.Mesh
    tokenizer: Any
    pool: envs.EnvPool

    @classmethod
    def create(cls, cfg: Config) -> "Runtime":
        return cls(cfg, make_mesh(cfg), load_tokenizer(cfg.model.tokenizer),
                   envs.EnvPool(num_workers=8, timeout_s=cfg.env.step_timeout_s))

    def env_factory(self) -> Callable[[], envs.Environment]:
        """Builds the configured environment; rollout limits apply unless options override them."""
        e = self.cfg.env
        options = {"max_steps": e.max_steps, "max_invalid_calls": e.max_invalid_calls, **e.options}
        try:  # fail early, naming the config field, on a bad name or option
            envs.make(e.name, **options)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"env.name / env.options: {err.args[0] if err.args else err}") from None
        return lambda: envs.make(e.name, **options)

    def settings(self) -> RolloutSettings:
        return RolloutSettings(max_steps=self.cfg.env.max_steps, max_context=self.cfg.rollout.max_context)

    def sampler(self, model, batch_size: int, *, greedy: bool = False) -> Sampler:
        r = self.cfg.rollout
        sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, greedy=greedy)
        return Sampler(model, batch_size=batch_size, capacity=r.max_context, max_new_tokens=r.max_new_tokens,
                       sampling=sampling, mesh=self.mesh)

    def engine(self, sampler, make_env=None) -> RolloutEngine:
        return RolloutEngine(make_env or self.env_factory(), self.tokenizer, sampler, self.settings(), self.pool)

    def layout(self, records: list[TrajectoryRecord], num_rows: int | None = None) -> StepBatch:
        """The configured layout of a batch of records (numpy arrays), rows bucketed."""
        if self.cfg.rollout.layout == "packed":
            return packed_batch(records, self.cfg.env.max_steps)
        return step_rows_batch(records, self.cfg.env.max_steps, num_rows=num_rows)

    def batch_sharding(self) -> NamedSharding:
        """Rows over (data, fsdp); everything else replicated."""
        return NamedSharding(self.mesh, P(("data", "fsdp")))

    def put(self, tree):
        """Places a host pytree of row-major arrays with ``batch_sharding``."""
        sharding = self.batch_sharding()
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)
