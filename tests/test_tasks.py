"""Training and held-out tasks never meet: the trainer's task pipeline against its evaluator's."""

import pytest

from steppo_jax.envs import TaskSplit, make
from steppo_jax.train.config import ConfigError, load_config
from steppo_jax.train.rl import Trainer
from steppo_jax.train.tasks import TaskBatches, demo_tasks, task_split
from tests.test_envs_hotpotqa import synthetic_records, write_json

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
        "model.warm_start=null", "model.critic=shared", "rollout.group_size=1", "rollout.tasks_per_iter=4",
        "optim.minibatches=1", "rollout.max_context=256", "env.eval_tasks=8"]


def trainer_tasks(cfg, iterations):
    """(ids the trainer's pipeline trains on over ``iterations``, ids its evaluator rolls out)."""
    trainer = Trainer(cfg, log=lambda _: None)
    train = [t for it in range(iterations) for t in trainer.process_tasks(it)]
    return train, list(trainer.evaluator.tasks)


@pytest.mark.slow
def test_hotpotqa_trains_on_every_train_question_and_never_on_an_eval_one(tmp_path):
    train_file = write_json(tmp_path / "train.json", synthetic_records(40))
    dev_file = write_json(tmp_path / "dev.json", synthetic_records(12, seed=1, first=40))
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", "env.name=hotpotqa",
                             f"env.options={{path: {train_file}, eval_path: {dev_file}}}"])
    train, held_out = trainer_tasks(cfg, iterations=30)  # 3 epochs of 10 batches of 4
    env = make("hotpotqa", path=train_file, eval_path=dev_file)
    question = lambda task: env.reset(*task).messages[1]["content"]  # noqa: E731
    trained = {question(t) for t in train}
    evaluated = {question(t) for t in held_out}
    assert trained == {r["question"] for r in synthetic_records(40)}  # the whole train file
    assert evaluated == {r["question"] for r in synthetic_records(8, seed=1, first=40)}
    assert not trained & evaluated
    epochs = [[t for t, _ in train[i:i + 40]] for i in range(0, 120, 40)]
    assert all(sorted(e) == list(range(40)) for e in epochs) and epochs[0] != epochs[1]


def test_generated_env_trains_below_and_evaluates_right_after_train_tasks():
    cfg = load_config(None, ["env.name=calculator", "env.train_tasks=20", "env.eval_tasks=8"])
    split = task_split(cfg.env, make("calculator"))  # what the trainer and its evaluator call
    batches = TaskBatches(split.train, cfg.rollout.tasks_per_iter, cfg.seed)
    assert {t for i in range(50) for t, _ in batches(i)} == set(range(20))
    assert split.eval == range(20, 28)


def test_default_split_of_a_generated_env_is_unchanged():
    cfg = load_config(None, ["env.eval_tasks=64"])
    split = task_split(cfg.env, make("multihop_qa"))
    assert (split.train, split.eval) == (range(10_000), range(10_000, 10_064))


def test_task_batches_are_a_pure_function_of_seed_and_iteration():
    a, b = TaskBatches(range(90_447), 256, seed=3), TaskBatches(range(90_447), 256, seed=3)
    assert a.batches_per_epoch == 353  # the HotpotQA train split at 256 a batch, the rest dropped
    assert a(700) == b(700) and a(5) == b(5) and a(5) != a(358)
    assert a(0) != TaskBatches(range(90_447), 256, seed=4)(0)
    first_epoch = [t for i in range(353) for t, _ in a(i)]
    assert len(set(first_epoch)) == 353 * 256 and max(first_epoch) < 90_447


def test_overlapping_or_too_small_splits_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"held-out ids 90..119 overlap in 90..99"):
        TaskSplit(train=range(100), eval=range(90, 120))
    train_file = write_json(tmp_path / "train.json", synthetic_records(10))
    dev_file = write_json(tmp_path / "dev.json", synthetic_records(4, seed=1, first=10))
    env = make("hotpotqa", path=train_file, eval_path=dev_file)
    cfg = load_config(None, ["env.name=hotpotqa", "env.eval_tasks=5", "rollout.tasks_per_iter=4"])
    with pytest.raises(ConfigError, match="env.eval_tasks=5 exceeds the 4 held-out tasks"):
        task_split(cfg.env, env)
    cfg = load_config(None, ["env.name=hotpotqa", "env.eval_tasks=4", "env.train_tasks=11", "rollout.tasks_per_iter=4"])
    with pytest.raises(ConfigError, match="env.train_tasks=11 exceeds the 10 training tasks"):
        task_split(cfg.env, env)
    with pytest.raises(ConfigError, match="env.options: hotpotqa has no held-out questions"):
        task_split(cfg.env, make("hotpotqa", path=train_file))
    with pytest.raises(ConfigError, match=r"env.train_tasks = 2 must be >= rollout.tasks_per_iter \(4\)"):
        load_config(None, ["env.train_tasks=2", "rollout.tasks_per_iter=4"])


def test_sft_demonstrations_are_never_held_out(tmp_path):
    cfg = load_config(None, ["env.eval_tasks=8"])
    calculator = make("calculator")
    assert demo_tasks(cfg.env, calculator, 1_000_000, 3) == [1_000_000, 1_000_001, 1_000_002]
    with pytest.raises(ConfigError, match=r"sft.seed_offset=9998: demonstration ids 9998..10001 include held-out"):
        demo_tasks(cfg.env, calculator, 9_998, 4)
    train_file = write_json(tmp_path / "train.json", synthetic_records(10))
    dev_file = write_json(tmp_path / "dev.json", synthetic_records(8, seed=1, first=10))
    hotpotqa = make("hotpotqa", path=train_file, eval_path=dev_file)
    assert demo_tasks(cfg.env, hotpotqa, 1_000_000, 12) == list(range(10)) + [0, 1]  # training ids only
