"""The trainer: typed config, SFT warm start, the StepPO RL loop, checkpoints, metrics.

    from steppo_jax.train import Trainer, load_config
    summary = Trainer(load_config("configs/default.yaml", ["train.iterations=10"])).fit()
"""

from steppo_jax.train.checkpoint import CheckpointError, CheckpointManager
from steppo_jax.train.config import Config, ConfigError, load_config, save_config
from steppo_jax.train.rl import Trainer
from steppo_jax.train.sft import run_sft

__all__ = ["CheckpointError", "CheckpointManager", "Config", "ConfigError", "Trainer", "load_config", "run_sft",
           "save_config"]
