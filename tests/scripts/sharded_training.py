"""Run in its own process with 8 host CPU devices: a few training iterations on a data x
fsdp mesh give the same metrics and parameters as on one device."""

import os
import sys

from tests.devices import fake_cpu_devices

os.environ.update(fake_cpu_devices(8))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from steppo_jax.envs import register  # noqa: E402
from steppo_jax.train.rl import Trainer  # noqa: E402
from tests.test_train import tiny_config, warm_start  # noqa: E402

register("chain_test", "tests.train_envs:ChainEnv", overwrite=True)
KEYS = ("reward/mean", "success/rate", "policy/loss", "value/loss", "policy/entropy", "policy/clip_frac")


def run(tmp, *mesh):
    cfg = tiny_config(tmp, "sft.steps=40", "train.iterations=2", *mesh)
    trainer = Trainer(cfg, policy_params=warm_start(tiny_config(tmp + "_w", "sft.steps=40", "mesh.data=1")),
                      log=lambda _: None)
    metrics = [trainer.step() for _ in range(2)]
    return metrics, [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def main(tmp):
    assert jax.device_count() == 8
    single, p1 = run(os.path.join(tmp, "single"), "mesh.data=1")
    for mesh in (["mesh.data=8"], ["mesh.data=4", "mesh.fsdp=2"], ["mesh.data=4", "mesh.fsdp=2", "mesh.axis_types=auto"]):
        sharded, p8 = run(os.path.join(tmp, "_".join(mesh)), *mesh)
        for it, (a, b) in enumerate(zip(single, sharded)):
            for key in KEYS:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=2e-4, err_msg=f"{key} it {it} {mesh}")
        for x, y in zip(p1, p8):
            np.testing.assert_allclose(y, x, atol=2e-4, err_msg=str(mesh))
        print(f"sharded == single device on {mesh}")


if __name__ == "__main__":
    main(sys.argv[1])
