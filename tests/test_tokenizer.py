"""The shipped tiny tokenizer: loading, chat template, round trips, token-exact deltas."""

import copy
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from steppo_jax.envs import format_tool_call, make
from steppo_jax.tokenizer import (DEFAULT_PATH, END_OF_TURN, SPECIAL_TOKENS, TOOL_TOKENS,
                                  load_tokenizer, render, render_delta, render_delta_ids)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def expert_conversation(name, task_id, **options):
    """(opening messages, tools, [(reply, observation messages), ...]) of an expert episode,
    starting with one bad reply so an error observation is included."""
    env = make(name, **options)
    reset = env.reset(task_id, 0)
    turns = [("", env.step("").messages)]
    while True:
        reply = env.expert_action()
        result = env.step(reply)
        turns.append((reply, result.messages))
        if result.done or result.truncated:
            return reset.messages, reset.tools, turns


CONVERSATIONS = [("multihop_qa", 1, {"difficulty": 1}), ("multihop_qa", 2, {"difficulty": 4}),
                 ("calculator", 3, {"difficulty": 3}), ("sokoban", 4, {"difficulty": 2})]


def test_loads_through_transformers_with_small_vocab_and_asset(tok):
    auto = AutoTokenizer.from_pretrained(DEFAULT_PATH)
    assert auto.get_vocab() == tok.get_vocab()
    assert 1000 <= len(tok) <= 2100
    assert tok.eos_token == END_OF_TURN and tok.pad_token == "<|endoftext|>"
    for token in SPECIAL_TOKENS + TOOL_TOKENS:
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    size = sum(os.path.getsize(os.path.join(DEFAULT_PATH, f)) for f in os.listdir(DEFAULT_PATH))
    assert size < 500 * 1024
    assert tok.encode("Who is", add_special_tokens=True) == tok.encode("Who is",
                                                                        add_special_tokens=False)


def test_apply_chat_template_with_tools_and_generation_prompt(tok):
    messages, tools, _ = expert_conversation("multihop_qa", 0)
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=True)
    system = messages[0]["content"]
    assert text.startswith(f"<|im_start|>system\n{system}\n\n# Tools\n<tools>\n"
                           '{"type": "function", "function": {"name": "search"')
    assert text.endswith(f"<|im_start|>user\n{messages[1]['content']}<|im_end|>\n"
                         "<|im_start|>assistant\n")
    encoded = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert encoded["input_ids"] == tok.encode(text, add_special_tokens=False)
    no_tools = render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_tools == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("name, task_id, options", CONVERSATIONS)
def test_history_plus_delta_equals_full_render_as_text_and_ids(tok, name, task_id, options):
    messages, tools, turns = expert_conversation(name, task_id, **options)
    text = render(tok, messages, tools=tools, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    for reply, observations in turns:
        messages = messages + [{"role": "assistant", "content": reply}] + observations
        delta = render_delta(observations, tok)
        text += reply + END_OF_TURN + delta
        ids += tok.encode(reply + END_OF_TURN, add_special_tokens=False)
        ids += render_delta_ids(observations, tok)
        assert text == render(tok, messages, tools=tools, add_generation_prompt=True)
        assert ids == tok.encode(text, add_special_tokens=False)
    assert observations == [] and delta == "\n<|im_start|>assistant\n"
    assert render_delta(turns[0][1], tok, add_generation_prompt=False) == (
        f"\n<|im_start|>user\n<tool_response>\n{turns[0][1][0]['content']}\n"
        "</tool_response><|im_end|>\n")


@pytest.mark.parametrize("name, task_id, options", CONVERSATIONS)
def test_round_trips(tok, name, task_id, options):
    messages, tools, turns = expert_conversation(name, task_id, **options)
    for reply, observations in turns:
        messages += [{"role": "assistant", "content": reply}] + observations
    text = render(tok, messages, tools=tools)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert len(ids) < len(text) / 3  # BPE compresses the environments' text


def test_unseen_text_round_trips_through_bytes(tok):
    text = "Zoë → 東京\t  two  spaces\n\n<tool_call> {\"x\": [1e-3]}</tool_call>\r\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_structured_tool_calls_render_like_the_text_format(tok):
    arguments = {"query": "teacher of Kalo"}
    structured = [{"role": "user", "content": "q"},
                  {"role": "assistant", "content": "I search.",
                   "tool_calls": [{"type": "function",
                                   "function": {"name": "search", "arguments": arguments}}]}]
    as_text = [{"role": "user", "content": "q"},
               {"role": "assistant",
                "content": "I search.\n" + format_tool_call("search", arguments)}]
    assert render(tok, structured) == render(tok, as_text)


def test_render_delta_rejects_a_template_that_rewrites_history(tok):
    rewriting = copy.deepcopy(tok)
    rewriting.chat_template = ("{% for m in messages %}{% if loop.last %}<|im_start|>"
                               "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                               "{% endfor %}")
    with pytest.raises(ValueError, match="not append-only"):
        render_delta([{"role": "tool", "content": "x"}], rewriting)


def test_training_script_reproduces_the_shipped_tokenizer(tmp_path):
    out = tmp_path / "tok"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tokenizer.py"),
                    "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == open(os.path.join(DEFAULT_PATH, name), "rb").read()


def test_demo_names_are_single_tokens_in_prose_and_in_json(tok):
    # A tiny policy copies names from observations (" Kalo") into JSON arguments ("Kalo").
    from steppo_jax.envs.multihop_qa import LEVELS, NAMES
    for name in NAMES[:LEVELS[1].name_pool]:
        assert len(tok.encode(" " + name, add_special_tokens=False)) == 1, name
        assert len(tok.encode('"' + name + '"', add_special_tokens=False)) == 3, name


def test_render_delta_defaults_to_the_shipped_tokenizer(tok):
    observation = [{"role": "tool", "content": "The teacher of Kalo is Mira."}]
    assert render_delta(observation) == render_delta(observation, tok)
    assert render_delta_ids(observation) == render_delta_ids(observation, tok)
