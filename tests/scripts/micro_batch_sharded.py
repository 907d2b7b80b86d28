"""Run in its own process with 4 host CPU devices: micro-batched scoring passes and updates on
sharded meshes (explicit data x fsdp, explicit data x tensor with the vocabulary sharded, auto)
equal the whole-batch ones."""

import os

from tests.devices import fake_cpu_devices

os.environ.update(fake_cpu_devices(4))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from steppo_jax import sharding  # noqa: E402
from steppo_jax.models import Decoder, ModelConfig, ValueHead, create_sharded  # noqa: E402
from steppo_jax.train.config import AlgoSection  # noqa: E402
from steppo_jax.train.state import Models, TrainState  # noqa: E402
from steppo_jax.train.update import TrainBatch, make_update, score  # noqa: E402
from tests.test_update import V, random_batch  # noqa: E402

CFG = ModelConfig.tiny(vocab_size=V + 3, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=32)


def check(mesh):
    policy = create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh)
    head = create_sharded(lambda: ValueHead(CFG.d_model, rngs=nnx.Rngs(1)), mesh)
    (policy_def, policy_params), (head_def, head_params) = nnx.split(policy), nnx.split(head)
    models = Models(CFG, policy_def, head_def, "shared", "step")
    params = {"policy": policy_params, "critic": head_params}
    rows_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    batch = TrainBatch(*[None if x is None else jax.device_put(np.asarray(x), rows_sharding) for x in random_batch()])
    tx = optax.sgd(1.0)
    with jax.set_mesh(mesh):
        scores = [score(models, params, policy_params, batch.tokens, None, temperature=0.8, with_ref=True, chunk=5,
                        micro_batch_rows=m) for m in (0, 2)]
        state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
        update = [jax.jit(make_update(models, AlgoSection(entropy_coef=0.1, kl_coef=0.05), 0.8, tx, chunk=5,
                                      micro_batch_rows=m))(state, batch, np.arange(8)[::-1].copy()) for m in (0, 2)]
    for x, y in zip(*scores):
        np.testing.assert_allclose(y, x, atol=1e-5)
    for key in update[0][1]:
        np.testing.assert_allclose(update[1][1][key], update[0][1][key], rtol=1e-5, atol=1e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(update[0][0].params), jax.tree.leaves(update[1][0].params)):
        np.testing.assert_allclose(y, x, atol=1e-5)


def main():
    assert jax.device_count() == 4
    for shape, explicit in (((2, 2, 1), True), ((2, 1, 2), True), ((2, 2, 1), False)):
        check(sharding.make_mesh(*shape, explicit=explicit))
        print(f"micro-batched == whole batch on data x fsdp x tensor = {shape}, explicit={explicit}")
    print("ALL OK")


if __name__ == "__main__":
    main()
