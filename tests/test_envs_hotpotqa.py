"""HotpotQA loader and environment on small files written by the tests."""

import json
import os
import sys
import random

import pytest

from tests.env_policies import run_episode, success_rate
from steppo_jax.envs import make
from steppo_jax.envs.hotpotqa import load_examples

WORDS = ("river valley castle harbor mountain forest bridge island tower market garden "
         "temple lake desert canyon").split()


def synthetic_records(n, seed=0, first=0):
    """HotpotQA-shaped records (questions first .. first + n - 1): two supporting paragraphs
    and three distractors each."""
    rng = random.Random(seed)
    records = []
    for i in range(first, first + n):
        city, founder, year = f"Velmor{i}", f"Arden{i}", str(1500 + i)
        paragraphs = [
            [city, [f"{city} is a town near the {rng.choice(WORDS)}.",
                    f"{city} was founded by {founder}."]],
            [founder, [f"{founder} was an explorer.", f"{founder} was born in {year}."]],
        ]
        for j in range(3):
            title = f"{rng.choice(WORDS).title()} {i}-{j}"
            paragraphs.append([title, [f"{title} is a {rng.choice(WORDS)} landmark."]])
        rng.shuffle(paragraphs)
        records.append({
            "_id": f"q{i}", "question": f"In which year was the founder of {city} born?",
            "answer": year, "type": "bridge", "level": "medium", "context": paragraphs,
            "supporting_facts": [[city, 1], [founder, 1]],
        })
    return records


@pytest.fixture(scope="module")
def hotpot_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hotpot") / "dev.json"
    path.write_text(json.dumps(synthetic_records(200)))
    return str(path)


def test_expert_solves_and_random_rarely_does(hotpot_file):
    env = make("hotpotqa", path=hotpot_file)
    assert env.num_tasks == 200
    assert success_rate(env, policy="expert") >= 0.99
    assert success_rate(env, policy="random") <= 0.05


def test_search_ranks_the_right_paragraph_and_expert_reads_supporting_facts(hotpot_file):
    env = make("hotpotqa", path=hotpot_file, top_k=1)
    reset, steps = run_episode(env, 3, 0)
    assert reset.messages[1]["content"] == "In which year was the founder of Velmor3 born?"
    observations = [r.messages[0]["content"] for _, r in steps[:-1]]
    assert len(observations) == 2
    assert observations[0].startswith("Velmor3: ") and "founded by Arden3." in observations[0]
    assert observations[1] == "Arden3: Arden3 was an explorer. Arden3 was born in 1503."
    final = steps[-1][1]
    assert final.done and final.reward == 1.0 and final.info["f1"] == 1.0


def test_partial_answer_gets_f1_but_no_reward(hotpot_file):
    env = make("hotpotqa", path=hotpot_file)
    env.reset(0, 0)
    result = env.step('<tool_call>{"name": "answer", "arguments": {"answer": "in 1500 AD"}}'
                      "</tool_call>")
    assert result.reward == 0.0 and result.info["f1"] == pytest.approx(2 * (1 / 3) / (4 / 3))


def test_same_task_same_episode_and_task_range(hotpot_file):
    a, b = make("hotpotqa", path=hotpot_file), make("hotpotqa", path=hotpot_file)
    assert run_episode(a, 17, 0) == run_episode(b, 17, 0)
    with pytest.raises(IndexError, match="200 records"):
        a.reset(200, 0)


def test_hugging_face_layout_and_jsonl(tmp_path):
    hf = []
    for r in synthetic_records(3):
        titles, sentences = zip(*r["context"])
        facts_titles, facts_ids = zip(*r["supporting_facts"])
        hf.append({"id": r["_id"], "question": r["question"], "answer": r["answer"],
                   "context": {"title": list(titles), "sentences": list(sentences)},
                   "supporting_facts": {"title": list(facts_titles), "sent_id": list(facts_ids)}})
    path = tmp_path / "hf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in hf))
    original = tmp_path / "orig.json"
    original.write_text(json.dumps(synthetic_records(3)))
    assert load_examples(str(path)) == load_examples(str(original))


@pytest.mark.parametrize("content, message", [
    ('{"data": []}', "expected a JSON list"),
    ("[]", "no records"),
    ('[{"question": "q", "answer": "a", "context": [["t", ["s"]]]}]', "'supporting_facts'"),
    ('[{"question": "q", "answer": "a", "context": [3], "supporting_facts": []}]',
     "record 0: 'context' must hold"),
])
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        make("hotpotqa", path=str(path))


def test_missing_file_and_missing_parquet_reader(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        make("hotpotqa", path=str(tmp_path / "nope.json"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "dev.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow"):
        make("hotpotqa", path=str(path))


def test_parquet_in_hugging_face_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = []
    for r in synthetic_records(4):
        titles, sentences = zip(*r["context"])
        facts_titles, facts_ids = zip(*r["supporting_facts"])
        rows.append({"id": r["_id"], "question": r["question"], "answer": r["answer"],
                     "context": {"title": list(titles), "sentences": list(sentences)},
                     "supporting_facts": {"title": list(facts_titles),
                                          "sent_id": list(facts_ids)}})
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    original = tmp_path / "orig.json"
    original.write_text(json.dumps(synthetic_records(4)))
    assert load_examples(str(path)) == load_examples(str(original))
    assert success_rate(make("hotpotqa", path=str(path)), num_tasks=4) == 1.0


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_eval_path_questions_follow_the_training_ones(tmp_path):
    train = write_json(tmp_path / "train.json", synthetic_records(30))
    dev = write_json(tmp_path / "dev.json", synthetic_records(10, seed=1, first=30))
    env = make("hotpotqa", path=train, eval_path=dev)
    assert (env.task_split.train, env.task_split.eval) == (range(30), range(30, 40))
    assert env.reset(30, 0).messages[1]["content"] == "In which year was the founder of Velmor30 born?"
    assert success_rate(env, num_tasks=40) == 1.0


def test_a_question_in_both_files_or_no_eval_file_is_an_error(tmp_path):
    train = write_json(tmp_path / "train.json", synthetic_records(30))
    dev = write_json(tmp_path / "dev.json", synthetic_records(5, seed=1, first=28))
    with pytest.raises(ValueError, match=r"2 of the 5 questions of eval_path .*dev.json"):
        make("hotpotqa", path=train, eval_path=dev)
    with pytest.raises(ValueError, match="30 of the 30 questions"):
        make("hotpotqa", path=train, eval_path=train)
    with pytest.raises(ValueError, match="set env.options.eval_path"):
        make("hotpotqa", path=train).task_split


@pytest.fixture(scope="module")
def corpus_setup(tmp_path_factory):
    """Train and dev files and the corpus of all their paragraphs plus unrelated filler."""
    from steppo_jax.envs.corpus import main

    root = tmp_path_factory.mktemp("corpus")
    train = write_json(root / "train.json", synthetic_records(60))
    dev = write_json(root / "dev.json", synthetic_records(20, seed=1, first=60))
    corpus = root / "corpus.jsonl"
    main([str(corpus), train, dev])  # python -m steppo_jax.envs.corpus corpus.jsonl train.json dev.json
    count = len(corpus.read_text().splitlines())
    with corpus.open("a") as f:
        for i in range(200):
            f.write(json.dumps({"title": f"Filler {i}", "text": f"{random.Random(i).choice(WORDS)} "
                                                               f"notes number {i}."}) + "\n")
    return train, dev, str(corpus), count


def test_corpus_retrieval_finds_the_gold_paragraph_of_every_question(corpus_setup):
    from steppo_jax.envs.corpus import load_corpus

    train, dev, corpus, count = corpus_setup
    assert count == 80 * 5  # every paragraph of every context, no duplicates
    c = load_corpus(corpus)
    assert len(c.passages) == count + 200
    for example in load_examples(train) + load_examples(dev):
        city, founder = example.supporting_titles
        first = c.passages[c.index.search(example.question, 1)[0]]
        assert first.startswith(f"{city}: ") and f"founded by {founder}." in first
        assert c.passages[c.index.search(founder, 1)[0]].startswith(f"{founder}: ")


def test_corpus_mode_end_to_end(corpus_setup):
    train, dev, corpus, _ = corpus_setup
    env = make("hotpotqa", path=train, eval_path=dev, corpus=corpus, top_k=1)
    env.reset(65, 0)
    result = env.step('<tool_call>{"name": "search", "arguments": {"query": "Arden65"}}</tool_call>')
    assert result.messages[0]["content"] == "Arden65: Arden65 was an explorer. Arden65 was born in 1565."
    assert not result.done and result.info["hits"] == 1
    assert success_rate(env, num_tasks=80) == 1.0
    assert success_rate(env, num_tasks=80, policy="random") <= 0.05


def test_corpus_index_is_saved_beside_the_corpus_and_reloaded(corpus_setup, monkeypatch):
    from steppo_jax.envs import corpus as corpus_module

    _, _, corpus, _ = corpus_setup
    built = corpus_module.load_corpus(corpus)
    assert os.path.isfile(os.path.join(corpus + ".bm25s", "steppo_corpus.json"))
    corpus_module._load.cache_clear()
    import bm25s

    def no_indexing(*args, **kwargs):
        raise AssertionError("the saved index should have been loaded, not rebuilt")

    monkeypatch.setattr(bm25s.BM25, "index", no_indexing)
    loaded = corpus_module.load_corpus(corpus)
    monkeypatch.undo()
    assert loaded is not built
    for query in ("Arden7", "Velmor70 explorer", "castle", "no such words"):
        assert loaded.index.search(query, 3) == built.index.search(query, 3)


def test_bad_corpus_gives_a_one_line_error(tmp_path):
    train = write_json(tmp_path / "train.json", synthetic_records(3))
    with pytest.raises(FileNotFoundError, match="retrieval corpus not found: .*nope.jsonl") as err:
        make("hotpotqa", path=train, corpus=str(tmp_path / "nope.jsonl"))
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{"title": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: expected a JSON object with 'title' and 'text'"):
        make("hotpotqa", path=train, corpus=str(bad))
