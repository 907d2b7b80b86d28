"""A passage corpus on disk and its BM25 index, built once per process and shared.

The corpus is JSONL, one passage a line: ``{"title": ..., "text": ...}`` (other keys are
ignored), e.g. the 509k de-duplicated paragraphs of every HotpotQA context that the StepPO
authors retrieve from (``write_hotpotqa_corpus`` writes it from the HotpotQA files). The BM25
index is saved beside the corpus (``<corpus>.bm25s/``) when that directory is writable, so
the next process -- or every host of a pod, when the directory travels with the corpus --
loads it instead of indexing again; a saved index whose corpus changed is rebuilt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import threading

from steppo_jax.envs.retrieval import BM25Index

_LOCK = threading.Lock()  # one build per corpus even when environments are made concurrently


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Passages (``"title: text"``) and the BM25 index over them."""

    path: str
    passages: list[str]
    index: BM25Index


def _read_passages(path: str) -> list[str]:
    passages = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                passages.append(f"{record['title']}: {record['text']}")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path} line {n}: expected a JSON object with 'title' and 'text' "
                                 f"({type(err).__name__}: {err})") from None
    if not passages:
        raise ValueError(f"{path}: no passages")
    return passages


def _stamp(path: str, passages: list[str]) -> dict:
    return {"corpus_bytes": os.path.getsize(path), "passages": len(passages)}


def _load_or_build(path: str, passages: list[str]) -> BM25Index:
    saved = path + ".bm25s"
    stamp_file = os.path.join(saved, "steppo_corpus.json")
    if os.path.isfile(stamp_file):
        with open(stamp_file, encoding="utf-8") as f:
            if json.load(f) == _stamp(path, passages):
                return BM25Index.load(saved, passages)
    index = BM25Index(passages)
    try:
        tmp = tempfile.mkdtemp(prefix=os.path.basename(saved) + ".", dir=os.path.dirname(path))
    except OSError:  # a read-only corpus directory: the index lives in memory only
        return index
    try:  # written aside, then renamed: a reader never sees half an index
        index.save(tmp)
        with open(os.path.join(tmp, "steppo_corpus.json"), "w", encoding="utf-8") as f:
            json.dump(_stamp(path, passages), f)
        shutil.rmtree(saved, ignore_errors=True)
        os.replace(tmp, saved)
    except OSError:  # another process saved it in between
        shutil.rmtree(tmp, ignore_errors=True)
    return index


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime: float, size: int) -> Corpus:
    del mtime, size  # part of the cache key: a changed file is read again
    passages = _read_passages(path)
    return Corpus(path=path, passages=passages, index=_load_or_build(path, passages))


def load_corpus(path: str) -> Corpus:
    """The corpus at ``path`` with its BM25 index (cached per process while the file is unchanged)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retrieval corpus not found: {path!r} (JSONL, one "
                                '{"title": ..., "text": ...} per line)')
    stat = os.stat(path)
    with _LOCK:
        return _load(os.path.abspath(path), stat.st_mtime, stat.st_size)


def write_hotpotqa_corpus(sources, out_path: str) -> int:
    """Writes the de-duplicated (title, text) paragraphs of every context of the ``sources``
    (HotpotQA examples, e.g. ``load_examples`` of the train and dev files) to ``out_path`` as
    corpus JSONL; returns the number of passages. The StepPO authors' corpus is this over the
    train and validation splits of the distractor setting."""
    seen: set[tuple[str, str]] = set()
    with open(out_path, "w", encoding="utf-8") as f:
        for example in sources:
            for title, sentences in example.paragraphs:
                key = (title.strip(), " ".join(sentences).strip())
                if key[1] and key not in seen:
                    seen.add(key)
                    f.write(json.dumps({"title": key[0], "text": key[1]}, ensure_ascii=False) + "\n")
    return len(seen)


def main(argv: list[str] | None = None) -> None:
    """``python -m steppo_jax.envs.corpus OUT.jsonl HOTPOTQA_FILE...``: writes the corpus of the
    files' context paragraphs (``write_hotpotqa_corpus``)."""
    from steppo_jax.envs.hotpotqa import load_examples  # here: hotpotqa imports this module

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit("usage: python -m steppo_jax.envs.corpus OUT.jsonl HOTPOTQA_FILE...")
    count = write_hotpotqa_corpus([e for path in args[1:] for e in load_examples(path)], args[0])
    print(f"wrote {count} passages to {args[0]}")


if __name__ == "__main__":
    main()
