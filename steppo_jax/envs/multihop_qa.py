"""Multi-hop QA over a generated knowledge base of fictional entities (the default demo).

Each task is a small world: invented names linked by relations ("The teacher of Kalo is
Mira."), one short sentence per fact, and a chain question ("Who is the friend of the teacher
of Kalo?") whose answer needs one search per hop. The ``search`` tool runs BM25 over the
world's passages — the chain's facts plus distractor facts about the same names and relations;
``answer`` ends the episode with reward = exact match (SQuAD normalisation), F1 reported.

Difficulty (option ``difficulty``): 1 = 1–2 hops, 6 entities, top-1 passage (learnable by a
tiny model); 2 = 2 hops; 3 = 2–3 hops; 4 = 2–4 hops with 12 entities and top-2 passages.
Worlds are regenerated until every expert query ranks its fact strictly first, so the expert
always succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import random

from steppo_jax.envs.base import Reset
from steppo_jax.envs.qa_metrics import exact_match, f1_score
from steppo_jax.envs.retrieval import BM25Index
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

RELATIONS = ("teacher", "friend", "rival", "parent", "partner", "mentor")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class Level:
    """Generation parameters of one difficulty level."""

    min_hops: int
    max_hops: int
    num_entities: int
    num_distractors: int
    num_relations: int
    name_pool: int
    top_k: int


LEVELS = {
    1: Level(1, 2, 6, 6, 4, 30, 1),
    2: Level(2, 2, 8, 10, 6, 60, 2),
    3: Level(2, 3, 10, 14, 6, 120, 2),
    4: Level(2, 4, 12, 18, 6, 200, 2),
}


def _names() -> list[str]:
    """A fixed list of two-syllable invented names (same on every machine)."""
    rng = random.Random("multihop_qa/names")
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    names: list[str] = []
    while len(names) < max(level.name_pool for level in LEVELS.values()):
        name = (rng.choice(syllables) + rng.choice(syllables)).capitalize()
        if name not in names:
            names.append(name)
    return names


NAMES = _names()

SYSTEM_PROMPT = ("Answer the question. Use search to find facts, one hop at a time, "
                 "then call answer.")
TOOLS = [
    tool_schema("search", "Search the passages.", {"query": {"type": "string"}}),
    tool_schema("answer", "Give the final answer.", {"answer": {"type": "string"}}),
]


def passage(subject: str, relation: str, obj: str) -> str:
    return f"The {relation} of {subject} is {obj}."


def _question(chain: list[tuple[str, str, str]]) -> str:
    phrase = chain[0][0]
    for _, relation, _ in chain:
        phrase = f"the {relation} of {phrase}"
    return f"Who is {phrase}?"


@dataclasses.dataclass(frozen=True)
class World:
    """One task: the facts (the chain first), their passages, the question and the answer."""

    facts: list[tuple[str, str, str]]
    hops: int
    question: str
    answer: str

    @property
    def chain(self) -> list[tuple[str, str, str]]:
        return self.facts[:self.hops]


def generate_world(level: Level, rng: random.Random) -> World:
    """A world whose relations never chain an entity to itself through the same relation, so
    the query "<relation> of <subject>" has one fact with both words."""
    hops = rng.randint(level.min_hops, level.max_hops)
    names = rng.sample(NAMES[:level.name_pool], level.num_entities)
    relations = list(RELATIONS[:level.num_relations])
    path = rng.sample(names, hops + 1)
    chain_relations = rng.sample(relations, hops)
    facts = [(path[i], chain_relations[i], path[i + 1]) for i in range(hops)]
    subjects = {(s, r) for s, r, _ in facts}
    objects = {(o, r) for _, r, o in facts}
    distractors = 0
    for _ in range(50 * level.num_distractors):
        if distractors == level.num_distractors:
            break
        subject, obj = rng.sample(names, 2)
        relation = rng.choice(relations)
        if (subject, relation) in subjects | objects or (obj, relation) in subjects:
            continue
        facts.append((subject, relation, obj))
        subjects.add((subject, relation))
        objects.add((obj, relation))
        distractors += 1
    chain = facts[:hops]
    rest = facts[hops:]
    rng.shuffle(rest)
    return World(chain + rest, hops, _question(chain), chain[-1][2])


def _expert_query(subject: str, relation: str) -> str:
    return f"{relation} of {subject}"


def _retrievable(world: World, index: BM25Index) -> bool:
    for i, (subject, relation, _) in enumerate(world.chain):
        scores = index.scores(_expert_query(subject, relation))
        if any(scores[j] >= scores[i] for j in range(len(scores)) if j != i):
            return False
    return True


class MultihopQAEnv(ToolEnv):
    """Generated multi-hop QA with BM25 ``search`` and an ``answer`` tool.

    Options: difficulty (1–4), top_k (passages per search; default from the level), min_hops
    and max_hops (the range of question hops; default from the level, e.g. 1–3 hops on level
    1's small name pool), max_steps (default: the max hops + 3), plus the ``ToolEnv`` options;
    a final answer without a tool call (``allow_final_answer``) is the reply's last line.
    """

    name = "multihop_qa"

    def __init__(self, *, difficulty: int = 1, top_k: int | None = None, min_hops: int | None = None,
                 max_hops: int | None = None, max_steps: int | None = None, invalid_penalty: float = 0.1,
                 max_invalid_calls: int = 3, max_reply_chars: int = 2000,
                 allow_final_answer: bool = False):
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
        level = LEVELS[difficulty]
        lo = level.min_hops if min_hops is None else min_hops
        hi = level.max_hops if max_hops is None else max_hops
        most = min(level.num_entities - 1, level.num_relations)  # a chain visits distinct entities
        if not 1 <= lo <= hi <= most:
            raise ValueError(f"hops must satisfy 1 <= min_hops <= max_hops <= {most} at difficulty {difficulty}, "
                             f"got min_hops={lo}, max_hops={hi}")
        self.level = dataclasses.replace(level, min_hops=lo, max_hops=hi)
        self.difficulty = difficulty
        self.top_k = self.level.top_k if top_k is None else top_k
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        super().__init__(max_steps=self.level.max_hops + 3 if max_steps is None else max_steps,
                         invalid_penalty=invalid_penalty, max_invalid_calls=max_invalid_calls,
                         max_reply_chars=max_reply_chars, allow_final_answer=allow_final_answer)
        self.world: World | None = None
        self._passages: list[str] = []
        self._index: BM25Index | None = None
        self._seen: set[int] = set()

    def _new_task(self, task_id: int, seed: int) -> Reset:
        rng = random.Random(f"{self.name}/{self.difficulty}/{task_id}/{seed}")
        while True:
            world = generate_world(self.level, rng)
            passages = [passage(*fact) for fact in world.facts]
            index = BM25Index(passages)
            if _retrievable(world, index):
                break
        self.world, self._passages, self._index = world, passages, index
        self._seen = set()
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": world.question}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "hops": world.hops,
                           "gold": world.answer})

    def anchor(self) -> str:
        return json.dumps([self.world.question, sorted(self._seen)])

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        if call.name == "answer":
            return self._grade(call.arguments["answer"])
        hits = self._index.search(call.arguments["query"], self.top_k)
        self._seen.update(hits)
        if not hits:
            return ToolOutcome("No passages found.", info={"hits": 0})
        return ToolOutcome("\n".join(self._passages[i] for i in hits), info={"hits": len(hits)})

    def _final_answer(self, text: str) -> ToolOutcome:
        return self._grade(text.splitlines()[-1])

    def _grade(self, prediction: str) -> ToolOutcome:
        em = exact_match(prediction, self.world.answer)
        f1 = f1_score(prediction, self.world.answer)
        feedback = "Correct." if em else f"Wrong. The answer was {self.world.answer}."
        return ToolOutcome(feedback, reward=em, done=True, success=bool(em),
                           info={"em": em, "f1": f1, "prediction": prediction})

    def expert_action(self) -> str:
        """Search the first hop whose fact has not been shown yet; answer once all have."""
        for i, (subject, relation, _) in enumerate(self.world.chain):
            if i not in self._seen:
                query = _expert_query(subject, relation)
                return (f"I need the {relation} of {subject}.\n"
                        + format_tool_call("search", {"query": query}))
        return (f"The answer is {self.world.answer}.\n"
                + format_tool_call("answer", {"answer": self.world.answer}))

    def mistake_action(self) -> str | None:
        """Answering too early: after some but not all hops, the entity found last is given as
        the answer (the typical multi-hop failure). None before the first search or once the
        chain is complete."""
        seen = [i for i in range(self.world.hops) if i in self._seen]
        if not seen or len(seen) == self.world.hops:
            return None
        guess = self.world.chain[max(seen)][2]
        return f"The answer is {guess}.\n" + format_tool_call("answer", {"answer": guess})
