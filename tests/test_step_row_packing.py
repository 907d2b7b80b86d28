"""Per-step rows packed several to a row: first-fit decreasing, row counts, and packed == one
step per row for the decoder, the credit, the loss and its gradients."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from steppo_jax import credit
from steppo_jax.estimators import EstimatorConfig, get_estimator
from steppo_jax.models import Decoder, ModelConfig
from steppo_jax.rollout import TrajectoryRecord, packed_batch, step_rows_batch
from steppo_jax.rollout.records import first_fit_decreasing
from steppo_jax.train.config import load_config
from steppo_jax.train.rl import train_batch
from steppo_jax.train.state import build_models, make_mesh
from steppo_jax.train.update import assign_credit, denominators, loss_fn, score
from steppo_jax.types import validate

VOCAB, S = 64, 3


def make_records(seed: int, num: int = 8, rebuilt: bool = True) -> list[TrajectoryRecord]:
    """Trajectories of 1..S steps with random ids; ``rebuilt``: each step's context is a fresh
    prompt (a history window), else the stream so far."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(1, VOCAB, int(n)).tolist()  # noqa: E731
    records = []
    for i in range(num):
        r = TrajectoryRecord(task_id=i, seed=seed, group=i // 2, contexts=[] if rebuilt else None)
        r.append_context(ids(rng.integers(2, 6)))
        for _ in range(int(rng.integers(1, S + 1))):
            if rebuilt:
                r.contexts.append(ids(rng.integers(2, 24)))
            n = int(rng.integers(1, 6))
            r.append_action(ids(n), (-rng.random(n)).tolist())
            r.append_context(ids(rng.integers(1, 4)))
            r.rewards.append(float(rng.choice([0.0, 1.0, -0.5])))
            r.anchors.append(int(rng.integers(0, 3)))
        r.terminated = bool(rng.random() < 0.5)
        if rebuilt and not r.terminated:
            r.contexts.append(ids(rng.integers(2, 24)))  # the final state: what a next step would see
        records.append(r)
    return records


def test_first_fit_decreasing_packs_longest_first_into_the_first_bin_with_room():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 200).tolist()
    bins = first_fit_decreasing(lengths, 128)
    assert bins == first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 128) + 1
    with pytest.raises(ValueError, match="item 1 of length 129"):
        first_fit_decreasing([3, 129], 128)


def test_a_step_row_longer_than_the_rows_is_named():
    records = make_records(0)
    lengths = {(i, k): r.step_row_len(k) for i, r in enumerate(records) for k in range(r.num_steps)}
    n = max(lengths.values())
    i, k = min(key for key, m in lengths.items() if m == n)  # the first step row that does not fit
    with pytest.raises(ValueError, match=rf"step row \({i}, {k}\) has {n} tokens > seq_len={n - 1}"):
        step_rows_batch(records, S, seq_len=n - 1)


@pytest.mark.parametrize("row_multiple", [1, 3, 8])
def test_rows_are_the_fewest_multiple_of_row_multiple(row_multiple):
    records = make_records(1, num=12)
    one_per_row = validate(step_rows_batch(records, S, pack=False, row_multiple=row_multiple))
    packed = validate(step_rows_batch(records, S, seq_len=64, row_multiple=row_multiple))
    steps = sum(r.num_steps for r in records)
    for batch in (one_per_row, packed):
        used = int(np.sum(batch.seq_lens > 0))
        assert batch.batch_size % row_multiple == 0 and batch.batch_size < used + row_multiple
        assert int(np.sum(batch.slot_mask())) == steps
    finals = sum(not r.terminated for r in records)  # a final state per truncated trajectory
    assert int(np.sum(one_per_row.seq_lens > 0)) == steps + finals
    assert packed.batch_size < one_per_row.batch_size and packed.num_slots > 1
    assert packed.num_slots & (packed.num_slots - 1) == 0  # a power of two
    trajectories = validate(packed_batch(make_records(1, num=12, rebuilt=False), S, row_multiple=row_multiple))
    assert trajectories.batch_size == -(-12 // row_multiple) * row_multiple
    assert not trajectories.step_mask[12:].any()


def test_decoder_on_a_packed_row_equals_each_step_row_alone():
    model = Decoder(ModelConfig(model_type="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=8, mlp_dim=64), rngs=nnx.Rngs(0))
    records = make_records(2)
    packed = validate(step_rows_batch(records, S, seq_len=64))
    alone = validate(step_rows_batch(records, S, pack=False, seq_len=64))
    row_of = {(int(alone.traj_index[r, 0]), int(alone.step_index[r, 0])): r for r in range(alone.batch_size)
              if alone.traj_index[r, 0] >= 0}
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda tokens, segments: nnx.merge(graphdef, state)(tokens, segment_ids=segments))
    out = np.asarray(forward(packed.tokens, packed.segment_ids))
    ref = np.asarray(forward(alone.tokens, None))
    assert packed.num_slots > 1
    for r in range(packed.batch_size):
        for slot in np.flatnonzero(packed.traj_index[r] >= 0):
            where = np.flatnonzero(packed.segment_ids[r] == slot + 1)
            other = row_of[int(packed.traj_index[r, slot]), int(packed.step_index[r, slot])]
            np.testing.assert_array_equal(packed.tokens[r, where], alone.tokens[other, :where.size])
            np.testing.assert_allclose(out[r, where], ref[other, :where.size], atol=1e-5)


def test_loss_and_gradients_match_one_step_per_row():
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.d_ff=64", "algo.entropy_coef=0.01"])
    mesh = make_mesh(cfg)
    models, params = build_models(cfg, VOCAB, mesh)
    records = make_records(3)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    grad_fn = jax.jit(lambda p, mb: value_and_grad(p, mb, denominators(mb, models, cfg.algo), models, cfg.algo, 1.0,
                                                   512))

    def loss_and_grads(batch):
        rows = NamedSharding(mesh, P(("data", "fsdp")))  # as the trainer places batches
        batch = jax.tree.map(lambda x: jax.device_put(x, rows), batch)
        logp, ref_logp, values = score(models, params, None, batch.tokens, batch.segment_ids, temperature=1.0,
                                       with_ref=False)
        credit, _ = assign_credit(batch, values, algo=cfg.algo)
        # a step behind the current policy, so the ratios are not all 1
        old = jnp.where(batch.action_mask, batch.old_logp, 0.0)
        return grad_fn(params, train_batch(batch, logp, ref_logp, values, credit)._replace(old_logp=old))

    with jax.set_mesh(mesh):
        (loss_a, (metrics_a, _)), grads_a = loss_and_grads(validate(step_rows_batch(records, S, pack=False)))
        (loss_b, (metrics_b, _)), grads_b = loss_and_grads(validate(step_rows_batch(records, S, seq_len=64)))
    for key in ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl"):
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_a)) > 1e-4


def prefix_values(batch) -> np.ndarray:
    """A causal stand-in critic [B, T]: the value at p depends only on the tokens of p's
    segment (its row without segments) up to p, as a decoder's would."""
    seg = batch.segment_ids if batch.segment_ids is not None else np.zeros_like(batch.tokens)
    values = np.zeros(batch.tokens.shape, np.float32)
    for r in range(batch.batch_size):
        acc = 0.0
        for t in range(batch.seq_len):
            acc = (0.0 if t == 0 or seg[r, t] != seg[r, t - 1] else 0.7 * acc) + np.sin(batch.tokens[r, t])
            values[r, t] = acc
    return values


@pytest.mark.parametrize("rebuilt", [False, True])
def test_packed_trajectories_and_step_rows_give_the_same_credit_when_truncated(rebuilt):
    """Truncated trajectories ending in a final observation: the final state is the packed
    row's end, a segment of its own in step rows (packed several to a row or one per row);
    the same bootstrap values, advantages and returns in every layout."""
    records = make_records(4, rebuilt=rebuilt)
    truncated = np.array([not r.terminated for r in records])
    assert truncated.sum() >= 2
    est, cfg = get_estimator("step_gae"), EstimatorConfig(gamma=0.9, lam=0.8, whiten=False)

    @jax.jit
    def grid_credit(batch, values):
        out = est.fn(batch, values, cfg)
        adv_bs = credit.step_sums(out.advantages_bt, batch.step_ids, batch.num_slots)
        adv_bs = adv_bs / jnp.maximum(credit.step_counts(batch.step_ids, batch.num_slots), 1)
        return batch.to_grid(adv_bs), batch.to_grid(out.returns_bs), batch.bootstrap_values(values)

    layouts = [step_rows_batch(records, S, seq_len=64), step_rows_batch(records, S, pack=False)]
    if not rebuilt:
        layouts.append(packed_batch(records, S))
    results = [jax.device_get(grid_credit(validate(b), prefix_values(b))) for b in layouts]
    results = [(adv, ret, boot[truncated]) for adv, ret, boot in results]
    assert np.all(results[0][2] != 0)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_allclose(a, b, atol=1e-5)
