"""Hugging Face Hub ids wherever a checkpoint or tokenizer directory is asked for.

``model.hf_path``, ``model.tokenizer``, ``load_hf_checkpoint``, ``read_hf_config`` and
``load_tokenizer`` take a local directory or a hub id: a value that is not an existing directory
and looks like ``org/name`` is fetched with ``huggingface_hub.snapshot_download`` into the usual
Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads the cache only), and the snapshot's
directory is used::

    resolve_hf_path("Qwen/Qwen2.5-0.5B-Instruct")      # ~/.cache/huggingface/hub/models--Qwen--.../snapshots/<rev>
    resolve_hf_path("checkpoints/Qwen2.5-3B-Instruct")  # an existing directory: as it is
"""

from __future__ import annotations

import os
import re

CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")
"""What a checkpoint needs, fetched by default: config, safetensors (and their index), tokenizer
(``tokenizer.json``, ``vocab.json``, ``merges.txt``, SentencePiece or tiktoken files, chat
template); not the PyTorch ``*.bin`` or other framework copies of the weights."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(ValueError):
    """A hub id that is not a local directory and could not be fetched (offline, unknown, gated)."""


def is_hub_id(value: str) -> bool:
    """True for a value shaped like a hub repository id: ``org/name`` (letters, digits, ``-_.``)."""
    return _HUB_ID.fullmatch(value) is not None and ".." not in value and "--" not in value


def resolve_hf_path(path: str, files: tuple[str, ...] = CHECKPOINT_FILES) -> str:
    """A local directory for ``path``: ``path`` itself if it is a directory or does not look like
    a hub id (the caller then reports it missing), else the cache snapshot of hub id ``path``
    holding at least ``files`` (glob patterns), downloaded if needed.

    Raises ``HubError`` in one line naming the id when it cannot be fetched.
    """
    if os.path.isdir(path) or not is_hub_id(path):
        return path
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(path, allow_patterns=list(files))
    except Exception as err:  # offline, unknown or gated repository: the hub raises many types
        cause = f"{type(err).__name__}: {err}".replace("\n", " ")
        local = f"checkpoints/{path.split('/')[1]}"
        raise HubError(f"{path!r} is not a local directory and could not be fetched from the Hugging Face Hub "
                       f"({cause[:300]}); download it first (hf download {path} --local-dir {local}) and pass "
                       "that directory, or check the id") from err
