"""Train the tiny default tokenizer on conversations from the built-in environments.

Expert episodes of multihop_qa, calculator and sokoban (every difficulty; some episodes open
with a bad reply so error observations are seen too) are rendered through the chat template of
``steppo_jax.tokenizer``, and a byte-level BPE is trained on them with ``tokenizers``. The
result is saved as a ``transformers`` tokenizer directory (default: the shipped asset)::

    python scripts/train_tokenizer.py [--out DIR] [--vocab-size 2000] [--episodes 300]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from steppo_jax.envs import make  # noqa: E402
from steppo_jax.tokenizer import (CHAT_TEMPLATE, DEFAULT_PATH, END_OF_TURN,  # noqa: E402
                                  SPECIAL_TOKENS, TOOL_TOKENS)

SOURCES = ([("multihop_qa", d) for d in (1, 2, 3, 4)] + [("calculator", d) for d in (1, 2, 3)]
           + [("sokoban", d) for d in (1, 2, 3)])
BAD_REPLIES = ("", "I am not sure.", '<tool_call>{"name": "look", "arguments": {}}</tool_call>',
               '<tool_call>{"name": "search", "arguments": {"query": 1}}</tool_call>')


def conversations(episodes: int):
    """(messages, tools) of expert episodes; every 4th starts with a bad reply."""
    for name, difficulty in SOURCES:
        env = make(name, difficulty=difficulty)
        for task_id in range(episodes):
            reset = env.reset(task_id, seed=10_000)
            messages = list(reset.messages)
            if task_id % 4 == 0:
                bad = BAD_REPLIES[(task_id // 4) % len(BAD_REPLIES)]
                result = env.step(bad)
                messages += [{"role": "assistant", "content": bad}] + result.messages
            while True:
                action = env.expert_action()
                result = env.step(action)
                messages += [{"role": "assistant", "content": action}] + result.messages
                if result.done or result.truncated:
                    break
            yield messages, reset.tools


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TURN, pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
        model_max_length=8192, model_input_names=["input_ids", "attention_mask"])


def train(episodes: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the rendered expert conversations."""
    renderer = wrap(Tokenizer(models.BPE()))
    texts = [renderer.apply_chat_template(messages, tools=tools, tokenize=False)
             for messages, tools in conversations(episodes)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    hf = wrap(tokenizer)
    lengths = [len(hf.encode(t, add_special_tokens=False)) for t in texts]
    print(f"{len(texts)} conversations, {sum(map(len, texts)) / len(texts):.0f} chars and "
          f"{sum(lengths) / len(lengths):.0f} tokens on average; vocabulary {len(hf)}")
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_PATH, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--episodes", type=int, default=300, help="per environment and level")
    args = parser.parse_args()
    tokenizer = train(args.episodes, args.vocab_size)
    tokenizer.save_pretrained(args.out, save_jinja_files=False)  # template in tokenizer_config.json
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size / 1024:.0f} KiB): {', '.join(sorted(os.listdir(args.out)))}")


if __name__ == "__main__":
    main()
