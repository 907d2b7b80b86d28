"""BM25 retrieval over an in-memory passage list (the ``bm25s`` package)."""

from __future__ import annotations

import logging

import bm25s
import numpy as np

# bm25s sets its own logger to DEBUG on import, which floods every index build.
logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tokens(text: str) -> list[str]:
    return bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]


class BM25Index:
    """Lower-cased, English-stopword-filtered BM25 over ``passages``.

    Built from the passages, or loaded with ``BM25Index.load`` from a directory that ``save``
    wrote (so a large corpus is tokenised and indexed once, not by every process).
    """

    def __init__(self, passages: list[str], bm25: bm25s.BM25 | None = None):
        if not passages:
            raise ValueError("BM25Index needs at least one passage")
        self.passages = list(passages)
        if bm25 is None:
            bm25 = bm25s.BM25()
            bm25.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)
        self._bm25 = bm25

    def save(self, directory: str) -> None:
        """Writes the index (not the passages) to ``directory``."""
        self._bm25.save(directory, show_progress=False)

    @classmethod
    def load(cls, directory: str, passages: list[str]) -> "BM25Index":
        """The index ``save`` wrote to ``directory``, over the same ``passages``."""
        return cls(passages, bm25s.BM25.load(directory, show_progress=False))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query``: [num_passages] float32 (zeros when no
        query word is indexed)."""
        ids = self._bm25.get_tokens_ids(_tokens(query))
        if not ids:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(ids), dtype=np.float32)

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages with a positive score, best first (ties: lower
        index first). Linear in the number of passages: no full sort of a large corpus."""
        scores = self.scores(query)
        if k < len(scores):
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest score
            above = np.flatnonzero(scores > kth)
            top = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
        else:
            top = np.arange(len(scores))
        order = top[np.lexsort((top, -scores[top]))]
        return [int(i) for i in order if scores[i] > 0]
