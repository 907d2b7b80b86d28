"""The tiny default tokenizer, its Qwen-style chat template, and template deltas.

The shipped tokenizer (``steppo_jax/assets/tokenizer/``, built by ``scripts/train_tokenizer.py``)
is a byte-level BPE trained on the built-in environments' expert conversations. It loads with
``transformers.AutoTokenizer.from_pretrained(dir)`` or :func:`load_tokenizer`. Real models use
their own tokenizer directory; :func:`render_delta` works with any append-only chat template.

The chat template renders every message on its own, so a conversation's text only grows::

    <|im_start|>system\\n{system}\\n\\n# Tools\\n<tools>\\n{schema}...</tools>\\n{how to call}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{reply with <tool_call>...</tool_call>}<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{observation}\\n</tool_response><|im_end|>\\n
    <|im_start|>assistant\\n                                  (generation prompt)

Template delta (what the rollout loop appends after a sampled reply, token-exact): with the
reply ending in the end-of-turn token ``<|im_end|>``::

    render(history + [assistant reply] + new, gen=True)
        == render(history, gen=True) + reply + "<|im_end|>" + render_delta(new)
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

from steppo_jax.hub import resolve_hf_path

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")
END_OF_TURN = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", END_OF_TURN]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# No whitespace control and no literal newline right after a block tag: transformers renders
# with trim_blocks, which would eat it, so such newlines are written as {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = none %}{% set rest = messages %}{% endif %}"
    "{% if system is not none or tools %}"
    "<|im_start|>system\n{{ system if system is not none else 'You are a helpful assistant.' }}"
    "{% if tools %}"
    "{{ '\\n\\n' }}# Tools\n<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools>\nCall one tool per reply:\n<tool_call>\n"
    "{\"name\": <tool name>, \"arguments\": <arguments object>}\n</tool_call>"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% for message in rest %}"
    "{% if message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": {{ call['name'] | tojson }}, \"arguments\": "
    "{{ call['arguments'] if call['arguments'] is string else call['arguments'] | tojson }}}"
    "\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(path: str | None = None):
    """A ``transformers`` tokenizer from directory or hub id ``path`` (``None``: the shipped tiny
    tokenizer); a hub id resolves as checkpoints do (``steppo_jax.hub.resolve_hf_path``)."""
    from transformers import AutoTokenizer

    if path is None:
        if not os.path.isfile(os.path.join(DEFAULT_PATH, "tokenizer.json")):
            raise FileNotFoundError(f"the shipped tokenizer is missing from {DEFAULT_PATH}; "
                                    "run scripts/train_tokenizer.py")
        path = DEFAULT_PATH
    return AutoTokenizer.from_pretrained(resolve_hf_path(path))


def render(tokenizer, messages: Sequence[dict[str, Any]], *, tools=None,
           add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (and ``tools``)."""
    return tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=1)
def _shipped():
    return load_tokenizer()


_PROBE = [{"role": "user", "content": "probe question"},
          {"role": "assistant", "content": "probe reply"}]


def render_delta(new_messages: Sequence[dict[str, Any]], tokenizer=None, *,
                 add_generation_prompt: bool = True, end_of_turn: str | None = None) -> str:
    """Text to append after an assistant reply that ended with ``end_of_turn``.

    Renders a fixed probe conversation with and without ``new_messages`` and returns the
    difference, so it needs only the new messages and works for any append-only template.
    ``tokenizer`` defaults to the shipped one; ``end_of_turn`` to the tokenizer's EOS token
    (``<|im_end|>`` here and in Qwen).
    Raises ``ValueError`` when the template rewrites earlier turns (not append-only).
    """
    tokenizer = _shipped() if tokenizer is None else tokenizer
    end_of_turn = tokenizer.eos_token if end_of_turn is None else end_of_turn
    head = render(tokenizer, _PROBE[:1], add_generation_prompt=True)
    head += _PROBE[1]["content"] + end_of_turn
    full = render(tokenizer, _PROBE + list(new_messages),
                  add_generation_prompt=add_generation_prompt)
    if not full.startswith(head):
        raise ValueError("the chat template is not append-only: rendering a conversation "
                         "plus new messages does not start with the conversation's own "
                         f"rendering followed by {end_of_turn!r}")
    return full[len(head):]


def render_delta_ids(new_messages: Sequence[dict[str, Any]], tokenizer=None, *,
                     add_generation_prompt: bool = True,
                     end_of_turn: str | None = None) -> list[int]:
    """Token ids of :func:`render_delta` (no BOS/EOS added)."""
    tokenizer = _shipped() if tokenizer is None else tokenizer
    text = render_delta(new_messages, tokenizer, add_generation_prompt=add_generation_prompt,
                        end_of_turn=end_of_turn)
    return tokenizer.encode(text, add_special_tokens=False)
