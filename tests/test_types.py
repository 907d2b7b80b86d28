"""StepBatch: the worked example, validate() on malformed batches, grid/rows mapping."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax.types import BatchError, StepBatch, grid_to_rows, rows_to_grid, validate
from tests.step_data import packed_batch, random_trajectories, step_rows_batch


def worked_example() -> StepBatch:
    """DESIGN §2: prompt p0..p2, step 0 = a0..a2, observation o0 o1, step 1 = b0 b1."""
    ids = np.array([[-1, -1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1]], np.int32)
    return StepBatch(
        tokens=np.arange(1, 13, dtype=np.int32)[None] * (np.arange(12) < 10),
        action_mask=ids >= 0,
        step_ids=ids,
        seq_lens=np.array([10], np.int32),
        value_pos=np.array([[2, 7, 0]], np.int32),
        old_logp=np.zeros((1, 12), np.float32),
        ref_logp=np.zeros((1, 12), np.float32),
        step_rewards=np.array([[0.0, 1.0, 0.0]], np.float32),
        step_mask=np.array([[True, True, False]]),
        anchor_ids=np.zeros((1, 3), np.int32),
        terminated=np.array([True]),
        group_ids=np.array([0], np.int32),
    )


def replace(batch, **fields):
    return dataclasses.replace(batch, **{k: np.asarray(v) for k, v in fields.items()})


def test_worked_example_is_valid_and_matches_the_generator():
    batch = validate(worked_example())
    assert (batch.batch_size, batch.seq_len, batch.num_steps, batch.num_traj) == (1, 12, 3, 1)
    row, pos = batch.bootstrap_index()
    assert (int(row[0]), int(pos[0])) == (0, 9)


@pytest.mark.parametrize("seed", range(5))
def test_generated_batches_are_valid(seed):
    trajs = random_trajectories(np.random.default_rng(seed), 9, 5)
    validate(packed_batch(trajs, 5))
    validate(step_rows_batch(trajs, 5))


def ids_with(change):
    ids = worked_example().step_ids.copy()
    change(ids)
    return ids


MALFORMED = {
    "shape": (dict(action_mask=np.zeros((1, 11), bool)), "action_mask: shape"),
    "dtype": (dict(step_mask=np.ones((1, 3), np.int32)), "step_mask: dtype"),
    "non-prefix mask": (dict(step_mask=np.array([[True, False, True]])), "prefix"),
    "step id out of range": (dict(step_ids=ids_with(lambda i: i.__setitem__((0, 9), 3)),
                                  action_mask=ids_with(lambda i: i.__setitem__((0, 9), 3)) >= 0), "must be -1 or a slot"),
    "action without step": (dict(action_mask=np.array([[0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]], bool)), "has no step"),
    "step id off the action mask": (dict(action_mask=np.array([[0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]], bool)),
                                    "non-action token carries"),
    "value position at the first action": (dict(value_pos=np.array([[3, 7, 0]], np.int32)), "value_pos"),
    "value position after the step": (dict(value_pos=np.array([[2, 9, 0]], np.int32)), "value_pos"),
    "valid step without tokens": (dict(step_mask=np.array([[True, True, True]])), "no action tokens"),
    "tokens for an invalid step": (dict(step_mask=np.array([[True, False, False]])), "not a valid step"),
    "group id out of range": (dict(group_ids=np.array([4], np.int32)), "group_ids"),
    "action in the padding": (dict(seq_lens=np.array([9], np.int32)), "padding"),
    "steps out of order": (dict(step_ids=np.array([[-1, -1, -1, 1, 1, 1, -1, -1, 0, 0, -1, -1]], np.int32)), "in order"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_validate_names_field_and_rule(case):
    fields, message = MALFORMED[case]
    with pytest.raises(BatchError, match=message):
        validate(replace(worked_example(), **fields))


def test_validate_rejects_bad_layout():
    trajs = random_trajectories(np.random.default_rng(0), 6, 3, empty_frac=0)
    rows = step_rows_batch(trajs, 3)
    ti = np.array(rows.traj_index)
    ti[1, 0] = ti[0, 0]  # two slots claim one grid step, another step is left uncovered
    si = np.array(rows.step_index)
    si[1, 0] = si[0, 0]
    with pytest.raises(BatchError, match="exactly one slot"):
        validate(replace(rows, traj_index=ti, step_index=si))
    with pytest.raises(BatchError, match="outside the grid"):
        validate(replace(rows, traj_index=np.where(ti >= 0, ti + 100, ti)))


def two_packed_steps() -> StepBatch:
    """One row holding two step rows of one trajectory: [p a a | p p b] + 2 padding tokens."""
    ids = np.array([[-1, 0, 0, -1, -1, 1, -1, -1]], np.int32)
    return StepBatch(
        tokens=np.array([[5, 6, 7, 5, 8, 9, 0, 0]], np.int32), action_mask=ids >= 0, step_ids=ids,
        seq_lens=np.array([6], np.int32), value_pos=np.array([[0, 4]], np.int32),
        old_logp=np.zeros((1, 8), np.float32), ref_logp=np.zeros((1, 8), np.float32),
        step_rewards=np.array([[0.0, 1.0]], np.float32), step_mask=np.array([[True, True]]),
        anchor_ids=np.zeros((1, 2), np.int32), terminated=np.array([True]), group_ids=np.array([0], np.int32),
        traj_index=np.array([[0, 0]], np.int32), step_index=np.array([[0, 1]], np.int32),
        segment_ids=np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32),
        bootstrap_row=np.array([-1], np.int32), bootstrap_pos=np.array([-1], np.int32))


@pytest.mark.parametrize("segments, message", [
    ([1, 1, 1, 2, 2, 2, 2, 2], "padding token"),  # the padding in the last step's segment
    ([1, 1, 1, 2, 2, 2, 1, 1], "contiguous"),
    ([1, 1, 2, 2, 2, 2, 0, 0], "span several segments"),
    ([1, 1, 1, 1, 1, 2, 0, 0], "same segment"),  # step 1's value position in step 0's segment
])
def test_validate_checks_segments(segments, message):
    validate(two_packed_steps())
    with pytest.raises(BatchError, match=message):
        validate(replace(two_packed_steps(), segment_ids=np.array([segments], np.int32)))


def truncated_step_rows() -> StepBatch:
    """``two_packed_steps`` cut after step 1 (not terminated), its final state packed in the
    same row: [p a a | p p b | p b o] + 3 padding tokens; the final state's token is 8."""
    ids = np.array([[-1, 0, 0, -1, -1, 1, -1, -1, -1, -1, -1, -1]], np.int32)
    tokens = np.array([[5, 6, 7, 5, 8, 9, 5, 9, 4, 0, 0, 0]], np.int32)
    return dataclasses.replace(
        two_packed_steps(), tokens=tokens, action_mask=ids >= 0, step_ids=ids, seq_lens=np.array([9], np.int32),
        old_logp=np.zeros((1, 12), np.float32), ref_logp=np.zeros((1, 12), np.float32),
        terminated=np.array([False]), segment_ids=np.array([[1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]], np.int32),
        bootstrap_row=np.array([0], np.int32), bootstrap_pos=np.array([8], np.int32))


def test_bootstrap_reads_the_final_state_segment():
    batch = validate(truncated_step_rows())
    assert [int(x[0]) for x in batch.bootstrap_index()] == [0, 8]
    values = jnp.arange(12, dtype=jnp.float32)[None] * 10
    assert float(batch.bootstrap_values(values)[0]) == 80.0


@pytest.mark.parametrize("fields, message", [
    (dict(bootstrap_pos=[7]), "last token of its segment"),
    (dict(bootstrap_pos=[5]), "no action tokens"),  # the last step's reply: a state the critic never sees
    (dict(bootstrap_pos=[10]), "not a real token"),
    (dict(bootstrap_row=[1]), "not a real token"),
])
def test_validate_checks_the_bootstrap_position(fields, message):
    with pytest.raises(BatchError, match=message):
        validate(replace(truncated_step_rows(), **{k: np.array(v, np.int32) for k, v in fields.items()}))


def test_validate_requires_bootstrap_fields_for_step_rows_only():
    with pytest.raises(BatchError, match="bootstrap_row: is required"):
        validate(dataclasses.replace(truncated_step_rows(), bootstrap_row=None))
    with pytest.raises(BatchError, match="bootstrap_pos: is for per-step rows only"):
        validate(dataclasses.replace(worked_example(), bootstrap_pos=np.zeros((1,), np.int32)))


def test_rows_grid_round_trip():
    ti = jnp.array([[0, -1], [1, 0], [-1, -1]])
    si = jnp.array([[1, -1], [0, 0], [-1, -1]])
    x = jnp.array([[1.0, 9.0], [2.0, 3.0], [9.0, 9.0]])
    grid = rows_to_grid(x, ti, si, 2, 2)
    np.testing.assert_array_equal(grid, [[3.0, 1.0], [2.0, 0.0]])
    np.testing.assert_array_equal(grid_to_rows(grid, ti, si), [[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]])
