"""Orbax checkpoints that resume exactly: a state pytree plus a JSON ``meta`` dict per step.

The state (params, optimizer states, critic, typed PRNG keys, counters) is saved with orbax's
``StandardSave`` and restored onto the shardings of a target pytree; ``meta`` (iteration, data
position, config dict, …) is saved as JSON next to it. Saves are synchronous: when ``save``
returns, the step is committed (orbax writes to a temporary directory and renames it), so a
killed run resumes from its last completed save. Typed keys (``jax.random.key``) round-trip
as typed keys. The directory is a local path or a URI orbax accepts (``gs://bucket/run/checkpoints``:
in a multi-host run every host writes its own shards there, see docs/tpu_gpu.md). Every failure
to find, read or match a checkpoint is a ``CheckpointError``::

    ckpt = CheckpointManager("runs/x/checkpoints", keep=2)
    ckpt.save(10, state, {"iteration": 10})
    state, meta = ckpt.restore(target=abstract_like(state))
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from steppo_jax.train.storage import as_path


class CheckpointError(RuntimeError):
    """No checkpoint, an unreadable (corrupted) one, or one that does not fit the target."""


def abstract_like(tree: Any) -> Any:
    """``tree`` with each array replaced by a ``jax.ShapeDtypeStruct`` carrying its sharding.

    Works on live state and on the output of ``jax.eval_shape`` (left as is).
    """
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


def _leaf_path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _stored_shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a target leaf has on disk (typed keys are stored as their key data)."""
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    value = np.asarray(x)
    return value.shape, value.dtype


def _describe(shape, dtype) -> str:
    return f"shape {tuple(shape)} {np.dtype(dtype).name}"


def _first_mismatch(stored: Any, target: Any) -> str | None:
    """Where ``target`` differs from the checkpoint's metadata tree, or None if it fits."""
    stored_leaves = {_leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    target_leaves = {_leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    for path, x in target_leaves.items():
        if path not in stored_leaves:
            return f"leaf {path!r} of the target is not in the checkpoint"
        shape, dtype = _stored_shape_dtype(x)
        meta = stored_leaves[path]
        stored_shape, stored_dtype = tuple(meta.shape), np.dtype(meta.dtype)
        if isinstance(meta, ocp.metadata.ScalarMetadata):
            # A Python scalar has no width: int32 (from jax.eval_shape) fits a stored int.
            fits = shape == () and dtype.kind == stored_dtype.kind
        else:
            fits = (shape, dtype) == (stored_shape, stored_dtype)
        if not fits:
            return (f"leaf {path!r} has {_describe(stored_shape, stored_dtype)} in the checkpoint "
                    f"but {_describe(shape, dtype)} in the target")
    for path in stored_leaves:
        if path not in target_leaves:
            return f"leaf {path!r} of the checkpoint is not in the target"
    return None


def _short(err: Exception, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " …"


class CheckpointManager:
    """Numbered checkpoints of ``(state, meta)`` in ``directory``, the newest ``keep`` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        path = as_path(directory)
        self.directory = os.fspath(path)
        self._manager = ocp.CheckpointManager(
            path,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False,
                cleanup_tmp_directories=True, create=True))
        # The temporary-directory cleanup runs in a background thread: finish it now, or a
        # process that exits right away (a CLI error) races it at interpreter shutdown.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves ``state`` and the JSON-serialisable ``meta`` as ``step``; returns once committed."""
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"meta for step {step} is not JSON-serialisable: {err}") from None
        if step in self.all_steps():
            raise CheckpointError(f"step {step} already exists in {self.directory}")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the latest).

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (see ``abstract_like``)
        whose structure, shapes and dtypes the checkpoint must match; leaves are restored onto
        its shardings. Without a target the state comes back as stored.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        where = f"checkpoint step {step} in {self.directory}"
        if target is not None:
            try:
                stored = self._manager.item_metadata(step)["state"]
            except Exception as err:  # orbax/tensorstore raise many types for unreadable files
                raise CheckpointError(f"{where} is unreadable (corrupted or incomplete?): "
                                      f"{_short(err)}") from err
            if stored is None:
                raise CheckpointError(f"{where} has no readable state metadata (corrupted?)")
            mismatch = _first_mismatch(stored, target)
            if mismatch:
                raise CheckpointError(f"{where} is incompatible with the target: {mismatch}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax/tensorstore raise many types for unreadable files
            raise CheckpointError(f"{where} is unreadable (corrupted or incomplete?): "
                                  f"{_short(err)}") from err
        return restored["state"], restored["meta"]

    def close(self) -> None:
        """Waits for pending work and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
