"""Short-answer scoring: SQuAD-style normalisation, exact match and token F1, each the best
over a question's gold aliases (Rajpurkar et al. 2016, arXiv:1606.05250, and its official
evaluation script).

Normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.
Two deliberate extensions of the SQuAD script, because the gold answers here are place names
from the Factbook: accents are folded ("Bogotá" == "Bogota") and punctuation means every
Unicode punctuation character, not only ASCII (so "’" and "–" go too).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, fold accents, strip punctuation and articles, collapse whitespace."""
    # Lowercased again after decomposition: NFKD can turn a letter-like symbol into a capital
    # ("ℌ" -> "H"), and normalising must be idempotent.
    decomposed = unicodedata.normalize("NFKD", text.lower()).lower()
    kept = (
        c
        for c in decomposed
        if not unicodedata.combining(c) and not unicodedata.category(c).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", "".join(kept)).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # As in SQuAD: two empty answers agree, an empty and a non-empty one do not.
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold (0.0 when there are no golds)."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def score_answer(prediction: str | None, golds: Sequence[str]) -> dict[str, float]:
    """`exact_match`, `f1` and `correct` (= exact match); all zero when there is no answer."""
    if prediction is None:
        return {"exact_match": 0.0, "f1": 0.0, "correct": 0.0}
    em = exact_match(prediction, golds)
    return {"exact_match": em, "f1": f1_score(prediction, golds), "correct": em}
