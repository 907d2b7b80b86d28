"""HotpotQA from local files: BM25 ``search``, then ``answer``.

Two retrieval modes. Distractor (the default): ``search`` ranks the question's own context
paragraphs (2 supporting, 8 distractors). Corpus (option ``corpus``, a JSONL file of
``{"title", "text"}`` passages): ``search`` ranks one shared corpus, as in the StepPO paper's
recipe (there: the 509k de-duplicated context paragraphs of HotpotQA's train and validation
splits, retrieved densely with BGE; here BM25 -- see ``steppo_jax.envs.corpus``).

Questions: ``path`` holds the training questions, ``eval_path`` (another file) the held-out
ones; task ids [0, n_train) are ``path``'s records, [n_train, n_train + n_eval) ``eval_path``'s
(``task_split``; the seed does not change a task). A question in both files is an error.

Reads the original format — a JSON list of records with ``_id``, ``question``, ``answer``,
``context`` (a list of ``[title, [sentences]]``) and ``supporting_facts`` (a list of
``[title, sentence_index]``) — from ``.json`` or ``.jsonl``, and the Hugging Face layout
(``id``; ``context = {"title": [...], "sentences": [[...]]}``; ``supporting_facts =
{"title": [...], "sent_id": [...]}``) from ``.parquet`` (needs ``pyarrow``) or JSON.
``answer`` ends the episode: reward = exact match after SQuAD normalisation, F1 reported. The
expert searches each supporting paragraph's title, then answers the gold answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from steppo_jax.envs.base import Reset, TaskSplit
from steppo_jax.envs.corpus import Corpus, load_corpus
from steppo_jax.envs.qa_metrics import exact_match, f1_score
from steppo_jax.envs.retrieval import BM25Index
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

SYSTEM_PROMPT = ("Answer the question. Use search to find the relevant paragraphs, "
                 "then call answer with a short answer.")
TOOLS = [
    tool_schema("search", "Search the paragraphs.", {"query": {"type": "string"}}),
    tool_schema("answer", "Give the final answer.", {"answer": {"type": "string"}}),
]


@dataclasses.dataclass(frozen=True)
class Example:
    """One HotpotQA question with its context paragraphs (title, sentences)."""

    id: str
    question: str
    answer: str
    paragraphs: list[tuple[str, list[str]]]
    supporting_titles: list[str]


def _normalise(record: dict, where: str) -> Example:
    for key in ("question", "answer", "context", "supporting_facts"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r} (HotpotQA records need _id, "
                             "question, answer, context, supporting_facts)")
    context, facts = record["context"], record["supporting_facts"]
    if isinstance(context, dict):
        context = list(zip(context["title"], context["sentences"]))
    if isinstance(facts, dict):
        facts = list(zip(facts["title"], facts["sent_id"]))
    try:
        paragraphs = [(str(title), [str(s) for s in sentences]) for title, sentences in context]
        titles = [str(title) for title, _ in facts]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: 'context' must hold [title, [sentences]] pairs and "
                         f"'supporting_facts' [title, sentence_index] pairs ({err})") from None
    if not paragraphs:
        raise ValueError(f"{where}: empty 'context'")
    return Example(id=str(record.get("_id", record.get("id", ""))),
                   question=str(record["question"]), answer=str(record["answer"]),
                   paragraphs=paragraphs, supporting_titles=list(dict.fromkeys(titles)))


def _read_records(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path!r} needs pyarrow (pip install pyarrow); "
                              "or convert the file to JSON") from None
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of HotpotQA records, "
                         f"got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float, size: int) -> tuple[Example, ...]:
    del mtime, size  # part of the cache key: a changed file is read again
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    return tuple(_normalise(r, f"{path} record {i}") for i, r in enumerate(records))


def _file_key(path: str) -> tuple[str, float, int]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"HotpotQA file not found: {path!r}")
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_mtime, stat.st_size


def load_examples(path: str) -> tuple[Example, ...]:
    """The examples of a HotpotQA file (cached while the file is unchanged)."""
    return _load(*_file_key(path))


@functools.lru_cache(maxsize=8)
def _check_disjoint(train_key: tuple, eval_key: tuple) -> None:
    """Raises if a question of the held-out file (by id or by text) is in the training file."""
    train, held_out = _load(*train_key), _load(*eval_key)
    ids, questions = {e.id for e in train if e.id}, {e.question.strip() for e in train}
    shared = [e for e in held_out if (e.id and e.id in ids) or e.question.strip() in questions]
    if shared:
        raise ValueError(f"hotpotqa: {len(shared)} of the {len(held_out)} questions of eval_path "
                         f"{eval_key[0]!r} are also in path {train_key[0]!r} (e.g. "
                         f"{shared[0].question!r}); held-out questions must not be trained on")


class HotpotQAEnv(ToolEnv):
    """HotpotQA with a ``search`` tool (distractor or corpus retrieval) and an ``answer`` tool.

    Options: path (training questions: JSON/JSONL/parquet, required), eval_path (held-out
    questions, a separate file; required for training), corpus (JSONL passages: corpus mode;
    None: distractor mode), top_k (passages per search), max_steps, plus the ``ToolEnv``
    options; a final answer without a tool call (``allow_final_answer``) is the reply's last
    line. ``num_tasks`` is the number of records of both files.
    """

    name = "hotpotqa"

    def __init__(self, *, path: str, eval_path: str | None = None, corpus: str | None = None,
                 top_k: int = 2, max_steps: int = 6, invalid_penalty: float = 0.1,
                 max_invalid_calls: int = 3, max_reply_chars: int = 4000,
                 allow_final_answer: bool = False):
        super().__init__(max_steps=max_steps, invalid_penalty=invalid_penalty,
                         max_invalid_calls=max_invalid_calls, max_reply_chars=max_reply_chars,
                         allow_final_answer=allow_final_answer)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.train_examples = load_examples(path)
        self.eval_examples: tuple[Example, ...] = ()
        if eval_path is not None:
            self.eval_examples = load_examples(eval_path)
            _check_disjoint(_file_key(path), _file_key(eval_path))
        self.corpus: Corpus | None = load_corpus(corpus) if corpus is not None else None
        self.top_k = top_k
        self.example: Example | None = None
        self._passages: list[str] = []
        self._index: BM25Index | None = None
        self._seen: set[int] = set()
        self._queries: set[str] = set()

    @property
    def num_tasks(self) -> int:
        return len(self.train_examples) + len(self.eval_examples)

    @property
    def task_split(self) -> TaskSplit:
        """Training ids: every record of ``path``; held-out ids: every record of ``eval_path``."""
        if not self.eval_examples:
            raise ValueError("hotpotqa has no held-out questions: set env.options.eval_path to a "
                             "file of questions separate from env.options.path (e.g. the dev set)")
        n = len(self.train_examples)
        return TaskSplit(train=range(n), eval=range(n, n + len(self.eval_examples)))

    def _new_task(self, task_id: int, seed: int) -> Reset:
        if not 0 <= task_id < self.num_tasks:
            raise IndexError(f"task_id {task_id} out of range: the files have "
                             f"{self.num_tasks} records")
        n = len(self.train_examples)
        self.example = self.train_examples[task_id] if task_id < n else self.eval_examples[task_id - n]
        if self.corpus is not None:
            self._passages, self._index = self.corpus.passages, self.corpus.index
        else:
            self._passages = [f"{title}: {' '.join(sentences)}"
                              for title, sentences in self.example.paragraphs]
            self._index = BM25Index(self._passages)
        self._seen, self._queries = set(), set()
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": self.example.question}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "id": self.example.id,
                           "gold": self.example.answer})

    def anchor(self) -> str:
        return json.dumps([self.example.id, self.example.question, sorted(self._seen)])

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        if call.name == "answer":
            return self._grade(call.arguments["answer"])
        query = call.arguments["query"]
        self._queries.add(query)
        hits = self._index.search(query, self.top_k)
        self._seen.update(hits)
        if not hits:
            return ToolOutcome("No paragraphs found.", info={"hits": 0})
        return ToolOutcome("\n\n".join(self._passages[i] for i in hits), info={"hits": len(hits)})

    def _final_answer(self, text: str) -> ToolOutcome:
        return self._grade(text.splitlines()[-1])

    def _grade(self, prediction: str) -> ToolOutcome:
        em = exact_match(prediction, self.example.answer)
        f1 = f1_score(prediction, self.example.answer)
        feedback = "Correct." if em else f"Wrong. The answer was {self.example.answer}."
        return ToolOutcome(feedback, reward=em, done=True, success=bool(em),
                           info={"em": em, "f1": f1, "prediction": prediction})

    def expert_action(self) -> str:
        """Search each supporting title not searched yet, then answer."""
        for title in self.example.supporting_titles:
            if title not in self._queries:
                return (f"I should look up {title}.\n"
                        + format_tool_call("search", {"query": title}))
        return (f"The answer is {self.example.answer}.\n"
                + format_tool_call("answer", {"answer": self.example.answer}))
