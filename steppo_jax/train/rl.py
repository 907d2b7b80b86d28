"""The RL loop: rollout -> scoring passes -> credit -> PPO epochs -> metrics, checkpoints.

    trainer = Trainer(load_config("configs/default.yaml"))
    summary = trainer.fit()

Every random choice of iteration i derives from (seed, i) and checkpoints hold the full
train state, so a resumed run continues exactly as the uninterrupted one would have.

Several processes (``STEPPO_DISTRIBUTED=1``, see train/distributed.py): process p of P runs
the environments and the sampler for the p-th contiguous slice of the iteration's tasks on its
own devices; its rows become the p-th block of global arrays on the train mesh, where the
scoring passes, credit and updates run as in one process. Sampling keys follow the global
trajectory index, the padded length is agreed across processes and minibatches are drawn on
device from the global batch, so the run does not depend on the process count. Process 0
writes the metrics, plots and summary; every process writes its shards of the checkpoints.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from steppo_jax import sharding
from steppo_jax.rollout import RolloutTimings, stats_table, table_stats
from steppo_jax.train import distributed
from steppo_jax.train.checkpoint import CheckpointError, CheckpointManager, abstract_like
from steppo_jax.train.config import Config, ConfigError, config_to_dict, save_config
from steppo_jax.train.evaluate import Evaluator
from steppo_jax.train.metrics import MetricsWriter, format_line, plot_metrics, progress, write_summary
from steppo_jax.train.runtime import Runtime
from steppo_jax.train.storage import as_path
from steppo_jax.train.state import build_models, copy_tree, critic_from_policy, init_state, make_optimizer
from steppo_jax.train.tasks import TaskBatches
from steppo_jax.train.update import TrainBatch, assign_credit, behavior_policy, drop_steps, make_update, score
from steppo_jax.types import StepBatch, validate


def load_policy_params(path: str, like):
    """Policy parameters from a checkpoint directory written by ``steppo sft`` or
    ``scripts/make_warm_start.py``; a relative path is also tried from the package's parent
    directory (so the shipped ``steppo_jax/assets/warm_start`` resolves from anywhere). ``path``
    may also be a URI (``gs://…``)."""
    if not as_path(path).is_dir():
        packaged = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, path)
        if not os.path.isabs(path) and os.path.isdir(packaged):
            path = packaged
        else:
            raise CheckpointError(f"warm-start checkpoint directory not found: {path}")
    with CheckpointManager(path) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        state, _ = manager.restore(step, target={"policy": abstract_like(like)})
    return state["policy"]


@functools.partial(jax.jit, static_argnames=("critic_level",))
def batch_stats(batch: StepBatch, logp, values, credit, rewards, *, critic_level: str | None) -> dict:
    """Scalars of an iteration's batch (one program): the largest gap between the sampler's
    and the trainer's log-probs, the reward sum, the real tokens, the advantages' std over the
    action tokens and the critic's explained variance on the returns it is trained toward.
    logp, values [B, T]; rewards [N, S]."""
    act = batch.action_mask
    n_act = jnp.maximum(jnp.sum(act), 1)
    adv_mean = jnp.sum(jnp.where(act, credit.advantages_bt, 0.0)) / n_act
    out = {"sampler_logp_gap": jnp.max(jnp.where(act, jnp.abs(logp - batch.old_logp), 0.0)),
           "reward_sum": jnp.sum(rewards), "tokens": jnp.sum(batch.seq_lens),
           "adv_std": jnp.sqrt(jnp.sum(jnp.where(act, (credit.advantages_bt - adv_mean) ** 2, 0.0)) / n_act)}
    if critic_level == "step":
        v = jnp.take_along_axis(values, batch.value_pos, axis=1)
        ret, mask = credit.returns_bs, batch.slot_mask()
    elif critic_level == "token":
        v = jnp.concatenate([values[:, :1], values[:, :-1]], axis=1)
        ret, mask = credit.returns_bt, batch.action_mask
    else:
        return out
    n = jnp.maximum(jnp.sum(mask), 2)
    var = lambda x: jnp.sum(jnp.where(mask, (x - jnp.sum(jnp.where(mask, x, 0)) / n) ** 2, 0)) / (n - 1)  # noqa: E731
    return out | {"explained_variance": 1.0 - var(ret - v) / jnp.maximum(var(ret), 1e-8)}


def train_batch(batch: StepBatch, logp, ref_logp, values, credit, behavior_weight_bs=None) -> TrainBatch:
    """The update's arrays of a scored batch: ``logp`` as the old log-probs (on the actions),
    the reference log-probs, values [B, T], the estimator's ``Credit`` and the steps'
    importance weights [B, S_row] (``update.behavior_policy``; default 1)."""
    zeros = jnp.zeros_like(logp)
    if behavior_weight_bs is None:
        behavior_weight_bs = jnp.ones(batch.value_pos.shape, jnp.float32)
    return TrainBatch(
        tokens=batch.tokens, step_ids=batch.step_ids, old_logp=jnp.where(batch.action_mask, logp, 0.0),
        ref_logp=ref_logp, adv_bt=credit.advantages_bt,
        returns_bt=credit.returns_bt if credit.returns_bt is not None else zeros, old_values_bt=values,
        value_pos=batch.value_pos, slot_mask=batch.slot_mask(),
        returns_bs=credit.returns_bs if credit.returns_bs is not None else jnp.zeros(batch.value_pos.shape),
        behavior_weight_bs=behavior_weight_bs, segment_ids=batch.segment_ids)


class Trainer:
    """One run: models, optimizer, rollout engine, evaluator, checkpoints and metrics."""

    def __init__(self, cfg: Config, *, policy_params=None, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log if distributed.is_main() else (lambda _: None)
        self.rt = Runtime.create(cfg)
        r, o = cfg.rollout, cfg.optim
        self.batch_size = r.tasks_per_iter * r.group_size
        processes = distributed.process_count()
        if r.tasks_per_iter % processes:
            raise ConfigError(f"rollout.tasks_per_iter={r.tasks_per_iter} must split evenly over the {processes} processes")
        self.local_tasks = r.tasks_per_iter // processes  # per process, and so per sampler
        if r.max_staleness and processes > 1:
            raise ConfigError(f"rollout.max_staleness={r.max_staleness} (asynchronous training) runs in one process, "
                              f"not {processes}")
        n_dev = sharding.batch_shards(self.rt.mesh)
        if self.batch_size % (o.minibatches * n_dev):
            raise ConfigError(f"rollout.tasks_per_iter x rollout.group_size = {self.batch_size} trajectories must split "
                             f"into optim.minibatches={o.minibatches} minibatches of a multiple of {n_dev} devices")
        if o.micro_batch_rows % n_dev:
            raise ConfigError(f"optim.micro_batch_rows={o.micro_batch_rows} must be a multiple of the {n_dev} devices "
                              "on the batch axes (mesh.data x mesh.fsdp)")
        self.models, params = build_models(cfg, len(self.rt.tokenizer), self.rt.mesh)
        if policy_params is not None:  # copied onto this mesh: the update donates its own state only
            params["policy"] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding, may_alias=False),
                                            policy_params, params["policy"])
        elif cfg.model.warm_start:
            params["policy"] = load_policy_params(cfg.model.warm_start, params["policy"])
        if self.models.critic == "separate" and (policy_params is not None or cfg.model.warm_start):
            params["critic"] = critic_from_policy(params["critic"], params["policy"])
        # the frozen reference is only ever read in the compute dtype: store it that way
        self.ref_params = copy_tree(params["policy"], cfg.model.compute_dtype) if cfg.algo.kl_coef else None
        self.tx = make_optimizer(o, cfg.train.iterations * o.epochs * o.minibatches)
        with jax.set_mesh(self.rt.mesh):
            self.state = init_state(params, self.tx)
        self.update = jax.jit(make_update(self.models, cfg.algo, r.temperature, self.tx, chunk=o.logprob_chunk,
                                          micro_batch_rows=o.micro_batch_rows), donate_argnums=0)
        policy = nnx.merge(self.models.policy_def, self._sampler_params(params["policy"]))
        local_rows = self.local_tasks * r.group_size
        self.sampler = self.rt.sampler(policy, local_rows, first_row=distributed.process_index() * local_rows)
        self.engine = self.rt.engine(self.sampler)
        self.evaluator = Evaluator(self.rt, self.models.policy_def, params["policy"])
        self.tasks = TaskBatches(self.rt.task_split.train, r.tasks_per_iter, cfg.seed)
        self.root_key = jax.random.key(cfg.seed)
        self.ckpt = CheckpointManager(as_path(cfg.run_dir) / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.iteration = 0
        self.summary: dict = {}
        # asynchronous training: iteration -> its rollout, run by one background thread
        self._rollouts: dict[int, Future] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="steppo-rollout") if r.max_staleness else None
        self._rollout_end = cfg.train.iterations  # no rollout is started for iterations past it

    # -- checkpoints --------------------------------------------------------------------------
    def _ckpt_tree(self):
        return {"state": self.state, "ref": self.ref_params}

    def save(self) -> None:
        meta = {"iteration": self.iteration, "data_position": self.iteration, "summary": self.summary,
                "config": config_to_dict(self.cfg)}
        self.ckpt.save(self.iteration, self._ckpt_tree(), meta)

    def restore(self) -> bool:
        """Loads the latest checkpoint of the run directory; False if there is none."""
        step = self.ckpt.latest_step()
        if step is None:
            return False
        tree, meta = self.ckpt.restore(step, target=abstract_like(self._ckpt_tree()))
        self.state, self.ref_params = tree["state"], tree["ref"]
        self.iteration, self.summary = int(meta["iteration"]), dict(meta.get("summary", {}))
        self.sampler.set_params(self._sampler_params(), version=self.iteration)
        return True

    # -- one iteration ------------------------------------------------------------------------
    def process_tasks(self, it: int) -> list[tuple[int, int]]:
        """This process's contiguous slice of iteration ``it``'s tasks."""
        start = distributed.process_index() * self.local_tasks
        return self.tasks(it)[start:start + self.local_tasks]

    def _local_batch(self, records) -> StepBatch:
        """This process's block of the iteration's batch (numpy): length, rows and slots per
        row common to every process (the length first: it decides how step rows pack), group
        and trajectory ids (and the rows of final states) counted over the whole batch."""
        seq_len, = distributed.max_over_processes((self.rt.seq_len(records),))
        batch = self.rt.layout(records, seq_len=seq_len)
        rows, slots = distributed.max_over_processes((batch.batch_size, batch.num_slots))
        if (rows, slots) != (batch.batch_size, batch.num_slots):
            batch = self.rt.layout(records, seq_len=seq_len, num_rows=rows, num_slots=slots)
        validate(batch)  # the step-tensor contract, on the host before anything is placed
        p = distributed.process_index()
        batch = batch.replace(group_ids=batch.group_ids + p * self.local_tasks)
        if not batch.packed:
            ti, br = batch.traj_index, batch.bootstrap_row
            batch = batch.replace(traj_index=np.where(ti >= 0, ti + p * batch.num_traj, -1),
                                  bootstrap_row=np.where(br >= 0, br + p * batch.batch_size, -1))
        return batch

    def _sampler_params(self, policy=None):
        """The sampler's copy of the policy (default: the train state's); its own buffers under
        asynchronous training, where it samples while the update donates the train state."""
        params = self.rt.to_sample_mesh(self.state.params["policy"] if policy is None else policy)
        return jax.tree.map(lambda x: x.copy(), params) if self.cfg.rollout.max_staleness else params

    def _collect(self, it: int):
        """Iteration ``it``'s rollout: (records, RolloutTimings, its wall seconds)."""
        t0 = time.perf_counter()
        rt = RolloutTimings()
        records = self.engine.collect(self.process_tasks(it), self.cfg.rollout.group_size,
                                      jax.random.fold_in(self.root_key, it), rt)
        return records, rt, time.perf_counter() - t0

    def _await_rollout(self, it: int):
        """Iteration ``it``'s rollout, the next ``rollout.max_staleness`` ones started behind it."""
        for j in range(it, min(it + self.cfg.rollout.max_staleness + 1, self._rollout_end)):
            if j not in self._rollouts:
                self._rollouts[j] = self._worker.submit(self._collect, j)
        return self._rollouts.pop(it).result()

    def stop_rollouts(self) -> None:
        """Cancels the rollouts started ahead and waits for the one running (asynchronous training)."""
        for future in self._rollouts.values():
            future.cancel()
        for future in self._rollouts.values():
            if not future.cancelled():
                future.exception()  # waits; a failure of a rollout nobody will use is dropped
        self._rollouts.clear()

    def _lag_stats(self, it: int, records, host_batch: StepBatch):
        """Each step's policy lag (iteration minus the version that sampled it): the grid [N, S]
        of steps staler than ``rollout.max_staleness`` and the lag metrics."""
        bound = self.cfg.rollout.max_staleness
        stale = np.zeros(host_batch.step_rewards.shape, bool)
        lags = []
        for i, rec in enumerate(records):
            if rec.failed is None:
                lag = it - np.asarray(rec.versions[:rec.num_steps], np.int64)
                stale[i, :len(lag)] = lag > bound
                lags.extend(lag.tolist())
        lags = np.asarray(lags, np.int64)
        out = {f"policy_lag/{k}": float(np.mean(lags == k)) if lags.size else 0.0 for k in range(bound + 1)}
        return stale, out | {"rollout/dropped_stale": float(np.sum(lags > bound))}

    def step(self) -> dict:
        """Runs iteration ``self.iteration``; returns its metrics."""
        it = self.iteration
        t0 = time.perf_counter()
        if self._worker:
            records, rt, collect_s = self._await_rollout(it)
        else:
            # outside the train mesh: the sampler runs on this process's sample mesh
            records, rt, collect_s = self._collect(it)
            self.sampler.release()  # no KV cache or sampler weights beside the update
        host_batch = self._local_batch(records)
        stale, lag_metrics = self._lag_stats(it, records, host_batch) if self._worker else (None, {})
        rollout_s = time.perf_counter() - t0
        with jax.set_mesh(self.rt.mesh):
            out = self._learn(it, records, host_batch, stale)
        self.iteration += 1
        return out | lag_metrics | {
            "time/rollout": rollout_s, "time/rollout_collect": collect_s, "time/rollout_sampler": rt.sampler_s,
            "time/rollout_env": rt.env_s, "time/rollout_glue": rt.glue_s,
            "rollout/slot_utilisation": rt.slot_utilisation}

    def _learn(self, it: int, records, host_batch: StepBatch, stale_ns: np.ndarray | None = None) -> dict:
        """Scoring passes, credit and the PPO epochs on this iteration's batch; its metrics.
        ``stale_ns`` [N, S]: steps left out of the policy loss (too old a policy sampled them)."""
        cfg, o = self.cfg, self.cfg.optim
        t1 = time.perf_counter()
        batch = self.rt.put_local(host_batch)
        rows = batch.tokens.shape[0]
        size = rows // o.minibatches
        if o.micro_batch_rows and size % o.micro_batch_rows:
            raise ConfigError(f"optim.micro_batch_rows={o.micro_batch_rows} must divide the {size} rows of a minibatch "
                              f"({rows} rows / optim.minibatches={o.minibatches})")
        logp, ref_logp, values = score(self.models, self.state.params, self.ref_params, batch.tokens,
                                       batch.segment_ids, temperature=cfg.rollout.temperature,
                                       with_ref=self.ref_params is not None, chunk=o.logprob_chunk,
                                       micro_batch_rows=o.micro_batch_rows)
        sampled = batch
        batch, behavior_weight, behavior = behavior_policy(batch, logp, algo=cfg.algo)  # pi_old, TIS weights
        batch = batch.replace(ref_logp=ref_logp)
        credit, rewards = assign_credit(batch, values, algo=cfg.algo)
        train = train_batch(batch, batch.old_logp, ref_logp, values, credit, behavior_weight)
        if stale_ns is not None:
            train = train._replace(step_ids=drop_steps(batch, self.rt.put_local(stale_ns)))
        # fetched before the updates run: on CPU devices two programs with collectives in
        # flight at once can starve each other of threads
        diag, behavior = jax.device_get((batch_stats(sampled, logp, values, credit, rewards,
                                                     critic_level=self.models.critic_level), behavior))
        t2 = time.perf_counter()

        order = np.random.default_rng([cfg.seed, it])
        updates = []
        for _ in range(o.epochs):
            perm = order.permutation(rows)
            for m in range(o.minibatches):
                self.state, metrics = self.update(self.state, train, perm[m * size:(m + 1) * size])
                updates.append(metrics)
        updates = jax.device_get(updates)
        self.sampler.set_params(self._sampler_params(), version=it + 1)
        t3 = time.perf_counter()

        stats = table_stats(distributed.gather_rows(stats_table(records)))
        mean = lambda k: float(np.mean([u[k] for u in updates]))  # noqa: E731
        real, processed = float(diag["tokens"]), float(rows * host_batch.seq_len)  # every forward runs on rows x T
        out = {"reward/mean": float(diag["reward_sum"]) / self.batch_size,
               "success/rate": stats.get("success", 0.0), "steps/mean": stats.get("steps", 0.0),
               "tokens/action": stats.get("action_tokens", 0.0), "tokens/real": real, "tokens/processed": processed,
               "tokens/packing_efficiency": real / processed,
               "rollout/failed": stats["failed"], "rollout/invalid_calls": stats.get("invalid_calls", 0.0),
               "policy/loss": mean("policy_loss"), "policy/approx_kl": mean("approx_kl"),
               "policy/entropy": mean("entropy"), "policy/clip_frac": mean("clip_frac"),
               "policy/ratio_mean": mean("ratio_mean"), "policy/ratio_max": float(np.max([u["ratio_max"] for u in updates])),
               "policy/grad_norm": mean("grad_norm"), "value/loss": mean("value_loss"),
               "skipped_updates": float(np.sum([u["skipped"] for u in updates])),
               "adv/std": float(diag["adv_std"]), "sampler_logp_gap": float(diag["sampler_logp_gap"]),
               "rows": float(rows), "seq_len": float(host_batch.seq_len),
               "time/passes": t2 - t1, "time/update": t3 - t2}
        if "kl_ref" in updates[0]:
            out["policy/kl"] = mean("kl_ref")
        if "explained_variance" in diag:
            out["value/explained_var"] = float(diag["explained_variance"])
        return out | {k: float(v) for k, v in behavior.items()}

    # -- the whole run ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        stats, _ = self.evaluator(self.state.params["policy"])
        return stats

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict:
        """Trains to ``train.iterations`` (or ``stop_after`` more iterations); returns the summary."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if not resume and self.ckpt.latest_step() is not None:
            raise ConfigError(f"{cfg.run_dir} already holds checkpoints of a run: continue it with --resume "
                             "or choose another run_dir")
        resumed = resume and self.restore()
        if resume and not resumed:
            self.log(f"no checkpoint in {self.ckpt.directory}: starting from scratch")
        main = distributed.is_main()  # the one process writing the run's files
        if main:
            save_config(cfg, as_path(cfg.run_dir) / "config.yaml")
            writer = MetricsWriter(cfg.run_dir, resume_iteration=self.iteration - 1 if resumed else None)
        if "initial_success_rate" not in self.summary:
            initial = self.evaluate()
            self.summary |= {"initial_success_rate": initial["success"], "initial_return": initial["return"]}
            if main:
                writer.write(-1, {"eval/" + k: v for k, v in initial.items()})
            self.log(f"initial greedy success on {cfg.env.eval_tasks} held-out tasks: {initial['success']:.1%}")
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.iteration + stop_after)
        self._rollout_end = end
        with progress(end - self.iteration, "train") as bar:
            while self.iteration < end:
                metrics = self.step()
                it = self.iteration
                if it % cfg.train.eval_every == 0 or it == cfg.train.iterations:
                    metrics |= {"eval/" + k: v for k, v in self.evaluate().items()}
                if main:
                    record = writer.write(it - 1, metrics)
                    bar.write(format_line(it - 1, record)) if bar.disable is False else self.log(format_line(it - 1, record))
                bar.update(1)
                if it % cfg.train.checkpoint_every == 0 or it == end:
                    self.save()
        self.stop_rollouts()
        if main:
            writer.close()
        wall = time.perf_counter() - t_start
        self.summary["wall_time_s"] = self.summary.get("wall_time_s", 0.0) + wall
        if self.iteration >= cfg.train.iterations:
            final = self.evaluate()
            self.summary |= {"final_success_rate": final["success"], "final_return": final["return"],
                             "iterations": self.iteration}
            if main:
                write_summary(cfg.run_dir, self.summary)
                plot_metrics(as_path(cfg.run_dir) / "metrics.jsonl", as_path(cfg.run_dir) / "curves.png")
        return self.summary
