"""Run in its own process: every estimator and loss, sharded over 8 host CPU devices,
equals the single-device result. Exits non-zero (with a message) on any mismatch."""

import os

from tests.devices import fake_cpu_devices

os.environ.update(fake_cpu_devices(8))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from steppo_jax import losses  # noqa: E402
from steppo_jax.estimators import ESTIMATORS, EstimatorConfig  # noqa: E402
from tests.step_data import packed_batch, random_trajectories, step_rows_batch  # noqa: E402

CFG = EstimatorConfig(gamma=0.95, lam=0.9)


def everything(batch, values, logp, logits):
    out = {}
    for name, est in ESTIMATORS.items():
        credit = est.fn(batch, values, CFG)
        out[name] = credit.advantages_bt
    adv_bs = jnp.where(batch.step_mask, batch.step_rewards - 0.3, 0.0)

    def step_loss(lp):
        (total, denom), stats = losses.step_policy_loss(lp, batch.old_logp, adv_bs, batch.step_ids, clip_low=0.1,
                                                         clip_high=0.1)
        return total / denom, stats

    (out["step_loss"], stats), out["step_loss_grad"] = jax.value_and_grad(step_loss, has_aux=True)(logp)
    out["step_clip_frac"] = stats.clip_frac[0]
    (tl, td), _ = losses.token_policy_loss(logp, batch.old_logp, out["token_gae"], batch.step_ids, dual_clip=3.0)
    out["token_loss"] = tl / td
    v_bs = jnp.take_along_axis(values, batch.value_pos, axis=1)
    out["value_loss"] = losses.value_loss(v_bs, v_bs * 0.5, batch.step_rewards, batch.step_mask, clip=0.2)[0]
    out["kl"] = jnp.where(batch.action_mask, losses.kl_penalty(logp, batch.ref_logp, "k3"), 0.0)
    out["entropy"] = losses.entropy(logits)
    return out


def main():
    rng = np.random.default_rng(0)
    B, S, T, V = 16, 4, 48, 11
    batch = packed_batch(random_trajectories(rng, B, S, num_groups=5), S, seq_len=T)
    values = rng.normal(size=(B, T)).astype(np.float32)
    logp = (batch.old_logp + 0.1 * rng.normal(size=(B, T))).astype(np.float32)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    expected = jax.jit(everything)(batch, values, logp, logits)
    # Per-step rows of the same kind of trajectories through every step-level estimator.
    rows = step_rows_batch(random_trajectories(rng, B, S, num_groups=5), S, num_rows=56)
    row_values = rng.normal(size=rows.tokens.shape).astype(np.float32)
    step_level = [n for n in ESTIMATORS if n != "token_gae"]
    rows_fn = jax.jit(lambda b, v: {n: ESTIMATORS[n].fn(b, v, CFG).advantages_bt for n in step_level})
    rows_expected = rows_fn(rows, row_values)
    checked = 0
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        for shape, names, batch_axes in (((8,), ("data",), "data"), ((4, 2), ("data", "fsdp"), ("data", "fsdp"))):
            mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
            with jax.set_mesh(mesh):
                sharding = NamedSharding(mesh, P(batch_axes))
                args = jax.device_put((batch, values, logp, logits), sharding)
                got = jax.jit(everything)(*args)
                rows_got = rows_fn(*jax.device_put((rows, row_values), sharding))
            for key, want in rows_expected.items():
                np.testing.assert_allclose(np.asarray(rows_got[key]), np.asarray(want), atol=1e-5, rtol=1e-5,
                                           err_msg=f"per-step rows {key} on mesh {shape} {axis_type}")
                checked += 1
            for key, want in expected.items():
                np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), atol=1e-5, rtol=1e-5,
                                           err_msg=f"{key} on mesh {shape} {axis_type}")
                checked += 1
            assert got["grpo"].sharding.spec[0] is not None or axis_type == AxisType.Auto, got["grpo"].sharding
    print(f"sharded == single device: {checked} outputs checked")


if __name__ == "__main__":
    main()
