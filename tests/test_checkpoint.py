"""Checkpoints: exact round trips (typed keys, optax state, ints), pruning, and clear errors."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from steppo_jax.train.checkpoint import CheckpointError, CheckpointManager, abstract_like
from tests.devices import subprocess_env

# After a corrupted restore has raised, orbax's reader threads may still report the failure,
# at whatever later test the garbage collector runs in.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int = 0):
    params = {"w": jax.random.normal(jax.random.key(seed), (3, 4)), "b": jnp.arange(4.0)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {"params": params, "opt": opt_state, "rng": jax.random.key(seed + 7),
            "iteration": jnp.int32(5), "data_position": 123}


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if isinstance(y, int):
            assert int(x) == y
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def manager(tmp_path):
    with CheckpointManager(str(tmp_path / "ckpt"), keep=2) as m:
        yield m


def _step_files(manager, step) -> list[pathlib.Path]:
    root = pathlib.Path(manager.directory) / str(step)
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_round_trip_typed_keys_optax_and_ints(manager):
    state = _state()
    meta = {"iteration": 5, "data_position": 123, "config": {"algo": {"estimator": "step_gae"}}}
    manager.save(5, state, meta)
    restored, restored_meta = manager.restore(target=abstract_like(state))
    _assert_equal(restored, state)
    assert restored_meta == meta
    assert isinstance(restored["opt"][1][0], optax.ScaleByAdamState)
    # The restored key continues the same random stream.
    np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                  jax.random.uniform(state["rng"], (3,)))


def test_restore_onto_target_shardings_and_eval_shape(manager):
    state = _state()
    manager.save(1, state, {})
    target = jax.eval_shape(lambda: _state())
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)
    restored, _ = manager.restore(1, target=target)
    _assert_equal(restored, state)
    assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_round_trip_nnx_state(manager):
    _, params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    manager.save(1, {"params": params}, {})
    restored, _ = manager.restore(target=abstract_like({"params": params}))
    _assert_equal(restored, {"params": params})


def test_restore_without_target(manager):
    manager.save(1, {"x": jnp.arange(3)}, {"a": 1})
    restored, meta = manager.restore()
    np.testing.assert_array_equal(restored["x"], np.arange(3))
    assert meta == {"a": 1}


def test_keep_prunes_old_steps_and_latest_step(manager, tmp_path):
    assert manager.latest_step() is None
    for step in (10, 20, 30):
        manager.save(step, _state(step), {"iteration": step})
    assert manager.all_steps() == [20, 30] and manager.latest_step() == 30
    assert sorted(os.listdir(manager.directory)) == ["20", "30"]
    # A fresh manager (a resumed process) sees the same steps and restores any kept one.
    with CheckpointManager(manager.directory) as again:
        assert again.latest_step() == 30
        restored, meta = again.restore(20, target=abstract_like(_state()))
    _assert_equal(restored, _state(20))
    assert meta == {"iteration": 20}


def test_interrupted_save_is_ignored(manager):
    manager.save(1, _state(1), {"iteration": 1})
    manager.save(2, _state(2), {"iteration": 2})
    # What a process killed while writing step 3 leaves behind: orbax's temporary directory.
    partial = pathlib.Path(manager.directory) / "3.orbax-checkpoint-tmp-1234"
    shutil.copytree(pathlib.Path(manager.directory) / "2", partial)
    (partial / "state" / "_METADATA").write_bytes(b"{")
    with CheckpointManager(manager.directory) as resumed:
        assert resumed.latest_step() == 2
        restored, meta = resumed.restore(target=abstract_like(_state()))
    assert meta == {"iteration": 2}
    _assert_equal(restored, _state(2))


def test_no_checkpoint(tmp_path):
    with CheckpointManager(str(tmp_path / "empty")) as m:
        with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
            m.restore(target=abstract_like(_state()))


def test_missing_step_lists_available(manager):
    manager.save(4, _state(), {})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*available steps: \[4\]"):
        manager.restore(7)


def test_save_errors(manager):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        manager.save(1, _state(), {"bad": object()})
    manager.save(1, _state(), {})
    with pytest.raises(CheckpointError, match="step 1 already exists"):
        manager.save(1, _state(), {})


@pytest.mark.parametrize("change, needle", [
    (lambda t: {**t, "params": {**t["params"], "w": jax.ShapeDtypeStruct((5, 4), jnp.float32)}},
     "leaf 'params/w' has shape (3, 4) float32 in the checkpoint but shape (5, 4) float32 in the target"),
    (lambda t: {**t, "iteration": jax.ShapeDtypeStruct((), jnp.float32)},
     "leaf 'iteration' has shape () int32 in the checkpoint but shape () float32 in the target"),
    (lambda t: {**t, "critic": {"v": jax.ShapeDtypeStruct((2,), jnp.float32)}},
     "leaf 'critic/v' of the target is not in the checkpoint"),
    (lambda t: {k: v for k, v in t.items() if k != "rng"},
     "leaf 'rng' of the checkpoint is not in the target"),
])
def test_incompatible_target_names_the_leaf(manager, change, needle):
    state = _state()
    manager.save(1, state, {})
    with pytest.raises(CheckpointError) as info:
        manager.restore(target=change(abstract_like(state)))
    assert "checkpoint step 1" in str(info.value) and "incompatible" in str(info.value)
    assert needle in str(info.value)


def _garble(path: pathlib.Path):
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))


def _truncate(path: pathlib.Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("relative, damage", [
    ("state/_METADATA", _garble),
    ("state/_METADATA", _truncate),
    ("state/manifest.ocdbt", _garble),
    ("state/manifest.ocdbt", _truncate),
    ("state/d", _truncate),
    ("meta/metadata", _garble),
])
def test_corrupted_checkpoint(manager, relative, damage):
    state = _state()
    manager.save(1, state, {"iteration": 1})
    root = pathlib.Path(manager.directory) / "1"
    targets = [p for p in _step_files(manager, 1) if str(p.relative_to(root)).startswith(relative)]
    assert targets, f"no file {relative} in {[str(p.relative_to(root)) for p in _step_files(manager, 1)]}"
    for path in targets:
        damage(path)
    with CheckpointManager(manager.directory) as reopened:
        with pytest.raises(CheckpointError, match="checkpoint step 1 .* unreadable"):
            reopened.restore(target=abstract_like(state))


_RESHARD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from steppo_jax.train.checkpoint import CheckpointManager

explicit = (AxisType.Explicit,) * 2
save_mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=explicit)
load_mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=explicit)
w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(save_mesh, P("data", None)))
state = {"w": w, "rng": jax.random.key(3)}
with CheckpointManager(sys.argv[1]) as ckpt:
    ckpt.save(1, state, {"iteration": 1})
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(load_mesh, P("data", "fsdp"))),
              "rng": jax.ShapeDtypeStruct((), state["rng"].dtype, sharding=NamedSharding(load_mesh, P()))}
    restored, _ = ckpt.restore(target=target)
assert restored["w"].sharding == target["w"].sharding, restored["w"].sharding
assert restored["rng"].sharding == target["rng"].sharding
np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64.0).reshape(8, 8))
np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
print("resharded restore ok")
"""


def test_restore_reshards_across_meshes_on_8_host_devices(tmp_path):
    root = pathlib.Path(__file__).resolve().parent.parent
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, "-c", _RESHARD, str(tmp_path / "ckpt")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "resharded restore ok" in proc.stdout
