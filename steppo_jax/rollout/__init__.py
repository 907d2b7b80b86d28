"""The host-side rollout loop: environments <-> sampler -> step tensors, token-exactly."""

from steppo_jax.rollout.engine import (STAT_KEYS, ChatCodec, RolloutEngine, RolloutSettings, RolloutTimings,
                                       rollout_stats, stats_table, table_stats)
from steppo_jax.rollout.records import TrajectoryRecord, anchor_id, bucket_len, packed_batch, step_rows_batch
from steppo_jax.rollout.slots import SlotEngine

__all__ = [
    "STAT_KEYS",
    "ChatCodec",
    "RolloutEngine",
    "RolloutSettings",
    "RolloutTimings",
    "SlotEngine",
    "TrajectoryRecord",
    "anchor_id",
    "bucket_len",
    "packed_batch",
    "rollout_stats",
    "stats_table",
    "step_rows_batch",
    "table_stats",
]
