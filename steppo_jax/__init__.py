"""steppo_jax: step-aligned policy optimization (StepPO) for agentic RL, in JAX.

The kernels are importable on their own, like rlax or optax::

    from steppo_jax import credit, losses, StepBatch, get_estimator

    adv_bs, ret_bs = credit.step_gae(rewards_bs, values_bs, step_mask_bs, bootstrap_b, gamma=1.0, lam=0.95)
    adv_bt = credit.to_tokens(adv_bs, step_ids_bt)
"""

from steppo_jax import credit, losses
from steppo_jax.estimators import ESTIMATORS, Credit, Estimator, EstimatorConfig, get_estimator
from steppo_jax.types import BatchError, StepBatch, grid_to_rows, rows_to_grid, validate

__all__ = [
    "BatchError",
    "Credit",
    "ESTIMATORS",
    "Estimator",
    "EstimatorConfig",
    "StepBatch",
    "credit",
    "get_estimator",
    "grid_to_rows",
    "losses",
    "rows_to_grid",
    "validate",
]
