"""Small pieces of the environments: QA metrics, safe arithmetic, BM25 retrieval."""

import pytest

from steppo_jax.envs.calculator import format_number, safe_eval
from steppo_jax.envs.qa_metrics import exact_match, f1_score, normalize_answer
from steppo_jax.envs.retrieval import BM25Index


@pytest.mark.parametrize("text, normal", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear", "apple pear"),
    ("Theatre", "theatre"),
    ("  ", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Mira.", "Mira") == 1.0
    assert exact_match("Mira Tel", "Mira") == 0.0
    # pred tokens {mira, tel, kon}, gold {mira, tel}: p = 2/3, r = 1, F1 = 0.8
    assert f1_score("Mira Tel Kon", "Mira Tel") == pytest.approx(0.8)
    assert f1_score("x b b", "b b c") == pytest.approx(2 / 3)
    assert f1_score("x", "y") == 0.0
    assert f1_score("the", "a") == 1.0
    assert f1_score("the", "Mira") == 0.0


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("-4 + +2", -2), ("7 / 2", 3.5), ("7 // 2", 3),
    ("7 % 4", 3), ("2 ** 10", 1024), ("2^3", 8), ("6 × 7 ÷ 2", 21), (" 1.5*2 ", 3.0),
])
def test_safe_eval_computes_arithmetic(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "Call is not allowed"),
    ("x + 1", "Name is not allowed"),
    ("(1).real", "Attribute is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("'a' * 3", "Constant is not allowed"),
    ("True + 1", "Constant is not allowed"),
    ("1 / 0", "division by zero"),
    ("10 ** 100", "exponent or base too large"),
    ("99999999 * 99999999", "out of range"),
    ("1 +", "cannot parse"),
    ("1" * 201, "longer than 200"),
    ("lambda: 1", "Lambda is not allowed"),
])
def test_safe_eval_rejects_everything_else(expression, message):
    with pytest.raises(ValueError, match=message):
        safe_eval(expression)


def test_format_number():
    assert [format_number(v) for v in (3, 3.0, 2.5, 1 / 3, -0.0)] == ["3", "3", "2.5",
                                                                        "0.333333", "0"]


def test_bm25_ranks_by_shared_words_and_ignores_stopwords():
    index = BM25Index(["The teacher of Kalo is Mira.", "The friend of Mira is Bemo.",
                       "The rival of Bemo is Tuva."])
    assert index.search("friend of Mira", 3) == [1, 0]
    assert index.search("rival", 1) == [2]
    assert index.search("the of is", 3) == []
    assert index.search("", 3) == []
    with pytest.raises(ValueError, match="at least one passage"):
        BM25Index([])
