"""Answer normalisation, exact match and F1, with expected values worked by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnrl.tasks.grading import exact_match, f1_score, normalize_answer, score_answer


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("Washington, D.C.", "washington dc"),
        ("Port-au-Prince", "portauprince"),  # SQuAD deletes punctuation, it does not split
        ("Bogotá", "bogota"),
        ("Côte d’Ivoire", "cote divoire"),  # a Unicode apostrophe is punctuation too
        ("Theatre", "theatre"),  # "the" is removed only as a whole word
        ("  ", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_is_the_best_over_aliases() -> None:
    assert exact_match("paris.", ["Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Ha Noi", ["Hanoi", "Ha Noi"]) == 1.0
    assert exact_match("Paris", []) == 0.0


def test_f1_arithmetic() -> None:
    # "the city of Paris" -> [city, of, paris]; gold [paris]; 1 token in common:
    # P = 1/3, R = 1/1, F1 = 2 * (1/3) * 1 / (1/3 + 1) = (2/3) / (4/3) = 0.5.
    assert f1_score("the city of Paris", ["Paris"]) == pytest.approx(0.5)
    # [federal, republic] vs [federal, parliamentary, republic]: 2 in common:
    # P = 2/2, R = 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = (4/3) / (5/3) = 0.8.
    assert f1_score("federal republic", ["federal parliamentary republic"]) == pytest.approx(0.8)
    # Repeated tokens count once per matching occurrence: [paris, paris] vs [paris]:
    # common = min(2, 1) = 1, P = 1/2, R = 1, F1 = 2 * (1/2) / (3/2) = 2/3.
    assert f1_score("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)
    # The best alias counts: 0.0 against "Lefkosia", 1.0 against "Nicosia".
    assert f1_score("Nicosia", ["Lefkosia", "Nicosia"]) == 1.0
    assert f1_score("Rome", ["Paris"]) == 0.0


def test_f1_of_empty_answers_follows_squad() -> None:
    # Both normalise to nothing ("the" and "a" are articles): they agree.
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("Paris", [""]) == 0.0


def test_score_answer() -> None:
    assert score_answer(None, ["Paris"]) == {"exact_match": 0.0, "f1": 0.0, "correct": 0.0}
    assert score_answer("paris", ["Paris"]) == {"exact_match": 1.0, "f1": 1.0, "correct": 1.0}
    partial = score_answer("city of Paris", ["Paris"])
    assert partial["correct"] == partial["exact_match"] == 0.0
    # [city, of, paris] vs [paris]: P = 1/3, R = 1, F1 = 0.5 (as above).
    assert partial["f1"] == pytest.approx(0.5)


@given(st.text(max_size=40), st.lists(st.text(max_size=40), min_size=1, max_size=3))
def test_scores_are_bounded_and_consistent(prediction: str, golds: list[str]) -> None:
    em, f1 = exact_match(prediction, golds), f1_score(prediction, golds)
    assert 0.0 <= f1 <= 1.0
    assert em in (0.0, 1.0)
    if em == 1.0:
        assert f1 == 1.0
    assert normalize_answer(normalize_answer(prediction)) == normalize_answer(prediction)
