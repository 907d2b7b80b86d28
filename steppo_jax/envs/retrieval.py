"""BM25 retrieval over a small in-memory passage list (the ``bm25s`` package)."""

from __future__ import annotations

import logging

import bm25s
import numpy as np

# bm25s sets its own logger to DEBUG on import, which floods every index build.
logging.getLogger("bm25s").setLevel(logging.WARNING)


def _tokens(text: str) -> list[str]:
    return bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]


class BM25Index:
    """Lower-cased, English-stopword-filtered BM25 over ``passages``."""

    def __init__(self, passages: list[str]):
        if not passages:
            raise ValueError("BM25Index needs at least one passage")
        self.passages = list(passages)
        self._bm25 = bm25s.BM25()
        corpus = bm25s.tokenize(self.passages, stopwords="en", show_progress=False)
        self._bm25.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query`` (zeros when no query word is indexed)."""
        tokens = _tokens(query)
        if not tokens:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages with a positive score, best first (ties: lower
        index first)."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in order if scores[i] > 0]
