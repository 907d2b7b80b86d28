"""Config loading: YAML + overrides, generic type checks, cross-field rules, clear errors."""

import dataclasses
import glob
import json
import os

import pytest

from steppo_jax.train.config import (
    Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config)

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_are_the_tiny_cpu_run():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.model.source, cfg.env.name, cfg.algo.estimator) == ("tiny", "multihop_qa", "step_gae")
    assert cfg.env.options == {}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_cover_envs_and_paper_settings():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.yaml", "multihop_qa.yaml", "calculator.yaml", "sokoban.yaml", "hotpotqa.yaml",
            "paper_hotpotqa_qwen2.5_3b.yaml", "paper_textworld_qwen3_4b.yaml"} <= names
    paper = load_config(os.path.join(os.path.dirname(CONFIGS[0]), "paper_hotpotqa_qwen2.5_3b.yaml"))
    assert paper.model.source == "hf" and paper.model.hf_path
    assert (paper.optim.lr, paper.optim.critic_lr, paper.algo.gamma) == (1e-6, 1e-5, 0.99)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nalgo: {estimator: rloo}\nrollout: {group_size: 2}\n")
    cfg = load_config(str(path), ["algo.estimator=grpo", "rollout.group_size=8", "optim.lr=1e-5",
                                  "env.options={difficulty: 2}", "algo.dual_clip=3",
                                  "model.warm_start=runs/sft", "algo.whiten=false"])
    assert cfg.seed == 3
    assert cfg.algo.estimator == "grpo" and cfg.rollout.group_size == 8
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.env.options == {"difficulty": 2}
    assert cfg.algo.dual_clip == 3.0 and isinstance(cfg.algo.dual_clip, float)
    assert cfg.model.warm_start == "runs/sft" and cfg.algo.whiten is False
    assert load_config(None, ["algo.dual_clip=null", "env.options.difficulty=3"]).env.options == {"difficulty": 3}


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 3e-4, critic_lr: 1E-5}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.optim.critic_lr) == (3e-4, 1e-5)


def test_save_and_dict_round_trip(tmp_path):
    cfg = load_config(None, ["algo.estimator=gigpo", "env.options={difficulty: 2}", "optim.lr=2e-5"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().algo.gamma = 0.5


def test_unknown_key_lists_valid_keys_and_suggests():
    msg = _error(["algo.estimatr=grpo"])
    assert "'algo.estimatr'" in msg and "did you mean 'estimator'" in msg and "kl_kind" in msg
    msg = _error(["rolout.group_size=2"])
    assert "'rolout'" in msg and "did you mean 'rollout'" in msg


def test_literal_lists_choices():
    msg = _error(["algo.estimator=ppo"])
    assert msg.startswith("algo.estimator") and "'ppo'" in msg
    for choice in ("step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "gigpo"):
        assert repr(choice) in msg
    assert "'float32', 'bfloat16'" in _error(["model.param_dtype=fp16"])


@pytest.mark.parametrize("override, needle", [
    ("rollout.group_size=2.5", "rollout.group_size: expected int, got float 2.5"),
    ("rollout.group_size=true", "rollout.group_size: expected int, got bool"),
    ("algo.whiten=1", "algo.whiten: expected bool, got int"),
    ("optim.lr=fast", "optim.lr: expected float, got str"),
    ("optim.lr=true", "optim.lr: expected float, got bool"),
    ("algo.dual_clip=abc", "algo.dual_clip: expected float or null"),
    ("env.options=3", "env.options: expected a mapping"),
    ("env=3", "env: expected a mapping of EnvSection fields"),
    ("model.hf_path=[1]", "model.hf_path: expected str or null"),
])
def test_wrong_types_name_the_field(override, needle):
    assert needle in _error([override])


def test_int_is_accepted_where_float_is_expected():
    cfg = load_config(None, ["algo.gamma=1", "env.step_timeout_s=5"])
    assert cfg.algo.gamma == 1.0 and isinstance(cfg.algo.gamma, float)
    assert isinstance(cfg.env.step_timeout_s, float)


@pytest.mark.parametrize("overrides, needle", [
    (["model.source=hf"], "model.hf_path"),
    (["algo.estimator=token_gae", "rollout.layout=step_rows"], "rollout.layout"),
    (["algo.estimator=grpo", "rollout.group_size=1"], "rollout.group_size"),
    (["rollout.group_size=0"], "rollout.group_size = 0 must be >= 1"),
    (["model.n_layers=-1"], "model.n_layers"),
    (["model.n_heads=0"], "model.n_heads = 0 must be >= 1"),
    (["algo.clip_low=0"], "algo.clip_low = 0.0 must be > 0"),
    (["algo.gamma=1.5"], "algo.gamma = 1.5 must be in [0, 1]"),
    (["algo.lam=-0.1"], "algo.lam"),
    (["rollout.top_p=0"], "rollout.top_p = 0.0 must be in (0, 1]"),
    (["rollout.top_p=1.01"], "rollout.top_p"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["rollout.max_new_tokens=512"], "rollout.max_context"),
    (["model.n_heads=3"], "must divide model.d_model"),
    (["model.n_kv_heads=3"], "must divide model.n_heads"),
    (["algo.dual_clip=0.5"], "algo.dual_clip"),
    (["algo.behavior_weight_cap=0.5"], "algo.behavior_weight_cap = 0.5 must be 0 (off) or >= 1"),
    (["algo.behavior_weight_cap=2", "algo.behavior_logp=sampler"], "needs algo.behavior_logp 'recomputed'"),
    (["algo.behavior_logp=trainer"], "algo.behavior_logp"),
    (["mesh.data=0"], "mesh.data"),
    (["sft.noise=2"], "sft.noise"),
    (["sft.mistake=-0.1"], "sft.mistake"),
    (["optim.minibatches=64"], "optim.minibatches"),
    (["optim.micro_batch_rows=-1"], "optim.micro_batch_rows = -1 must be >= 0"),
    (["optim.micro_batch_rows=3"], "optim.micro_batch_rows = 3 must divide the 16 rows of a minibatch"),
    (["optim.logprob_chunk=0"], "optim.logprob_chunk = 0 must be >= 1"),
    (["rollout.decode_chunk=0"], "rollout.decode_chunk = 0 must be >= 1"),
    (["rollout.decode_chunk=49"], "rollout.decode_chunk = 49 must be <= rollout.max_new_tokens (48)"),
    (["rollout.slots=-1"], "rollout.slots = -1 must be >= 0"),
    (["rollout.decode_rows=-1"], "rollout.decode_rows = -1 must be >= 0"),
    (["rollout.decode_widths=0"], "rollout.decode_widths = 0 must be >= 1"),
    (["rollout.slots=8", "rollout.decode_rows=9"], "rollout.decode_rows = 9 must be <= rollout.slots (8)"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness = -1 must be >= 0"),
    (["env.workers=0"], "env.workers = 0 must be >= 1"),
    (["rollout.max_staleness=1"], "rollout.max_staleness = 1 needs algo.behavior_weight_cap >= 1"),
])
def test_cross_field_rules(overrides, needle):
    assert needle in _error(overrides)


def test_hf_source_with_a_path_is_valid():
    cfg = load_config(None, ["model.source=hf", "model.hf_path=/models/qwen", "model.n_heads=3"])
    assert cfg.model.hf_path == "/models/qwen"


@pytest.mark.parametrize("override", ["algo.estimator", "=3", "seed"])
def test_override_without_equals(override):
    assert "must look like 'section.field=value'" in _error([override])


def test_override_into_a_scalar_is_rejected(tmp_path):
    assert "algo.gamma: expected float, got dict" in _error(["algo.gamma.x=1"])
    path = tmp_path / "c.yaml"
    path.write_text("algo: {gamma: 0.9}\n")
    assert "'algo.gamma.x=1': algo.gamma is not a section" in _error(["algo.gamma.x=1"], str(path))


def test_file_errors(tmp_path):
    assert "config file not found" in _error(path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: {estimator: grpo\nseed: [1,\n")
    assert "malformed YAML" in _error(path=str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "expected a mapping at the top level" in _error(path=str(listy))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("algo:\n  gama: 0.9\n")
    msg = _error(path=str(wrong))
    assert msg.startswith(f"{wrong}: ") and "'algo.gama'" in msg and "did you mean 'gamma'" in msg
    good = tmp_path / "good.yaml"
    good.write_text("seed: 1\n")
    assert _error(["seed=-1"], str(good)) == f"{good} with overrides: seed = -1 must be >= 0"


def test_empty_file_and_empty_sections_give_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)) == Config()
    sections = tmp_path / "sections.yaml"
    sections.write_text("model:\nalgo:\n")
    assert load_config(str(sections)) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_env_options_of_shipped_configs_are_accepted(path, tmp_path):
    from steppo_jax.envs import make

    cfg = load_config(path)
    if cfg.env.name == "hotpotqa":  # the shipped path points at a download; use a stand-in
        record = {"_id": "q0", "question": "Who founded Velmor?", "answer": "Arden",
                  "context": [["Velmor", ["Velmor was founded by Arden."]]],
                  "supporting_facts": [["Velmor", 0]]}
        (tmp_path / "hotpot.json").write_text(json.dumps([record]))
        (tmp_path / "dev.json").write_text(json.dumps([record | {"_id": "q1", "question": "Who?"}]))
        (tmp_path / "corpus.jsonl").write_text(json.dumps({"title": "Velmor", "text": "Founded by Arden."}))
        stand_ins = [f"env.options.path={tmp_path / 'hotpot.json'}", f"env.options.eval_path={tmp_path / 'dev.json'}"]
        if "corpus" in cfg.env.options:
            stand_ins.append(f"env.options.corpus={tmp_path / 'corpus.jsonl'}")
        cfg = load_config(path, stand_ins)
    if cfg.env.name == "textworld":
        pytest.importorskip("textworld")
    make(cfg.env.name, **cfg.env.options, max_steps=cfg.env.max_steps,
         max_invalid_calls=cfg.env.max_invalid_calls)
