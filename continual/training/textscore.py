"""Scoring generated text against a reference: exact match, token F1 and ROUGE-L (pure functions).

Normalisation, the same for all three scores: SQuAD's (lower case, punctuation and the articles
a/an/the removed, whitespace collapsed), so "Positive." matches "positive" and "the cat" matches
"cat"; but a number keeps its sign and decimal point ("-1" does not match "1", nor "3.5" "35"),
as arithmetic answers need. Where that would erase the whole text (an answer such as "A", "the" or "."), the text keeps
its articles, and then its punctuation: "A" is the word "a" and matches "a." but not "the", "." or
an empty answer. An empty answer (nothing generated) never scores. Exact match is what a
verbalised classification task is scored by (its answer is one label word); token F1 and
ROUGE-L give partial credit to free text.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

# Punctuation goes, except what belongs to a number: a minus sign before a digit ("-1" is not
# "1", as SQuAD's rule made it) and a point, comma, slash or colon between digits ("3.5" is not
# "35"); a comma before three digits and a boundary is a thousands mark, dropped ("1,000" = "1000").
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCT = re.compile(rf"(?<![\w-])-(?=\d)|(?<=\d)[.,/:](?=\d)|([{re.escape(string.punctuation)}])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _no_punct(text: str) -> str:
    return _PUNCT.sub(lambda m: " " if m.group(1) else m.group(0), _THOUSANDS.sub("", text))


def normalize(text: str) -> str:
    """SQuAD's normalisation, backing off where it would leave nothing (see the module docstring),
    and keeping the signs and points of numbers."""
    lower = text.lower()
    for form in (_ARTICLES.sub(" ", _no_punct(lower)), _no_punct(lower), lower):
        if form.strip():
            return " ".join(form.split())
    return ""


def exact_match(pred: str, ref: str) -> float:
    p = normalize(pred)
    return float(bool(p) and p == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return 0.0  # nothing generated (or nothing to find) scores nothing
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: the longest common token subsequence, as precision and recall."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def answer_macro_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Macro-F1 over the distinct reference answers (a verbalised task's label words): an answer
    that is none of them counts as wrong for every class, as a classifier's wrong label would."""
    p = np.asarray([normalize(x) for x in preds], dtype=object)
    r = np.asarray([normalize(x) for x in refs], dtype=object)
    scores = []
    for c in sorted(set(r.tolist())):
        tp = np.sum((p == c) & (r == c))
        fp, fn = np.sum((p == c) & (r != c)), np.sum((p != c) & (r == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def score_texts(preds: Sequence[str], refs: Sequence[str], metric: str) -> dict[str, float]:
    """Every text score of a prediction set; ``accuracy`` is the task's own ``metric``, and
    ``macro_f1`` the label-word macro-F1 (exact tasks) or the mean token F1 (free text), so the
    accuracy and F1 matrices of a stream mean the same for generative and classification tasks."""
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(SCORERS)}")
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    out = {name: float(np.mean([f(p, r) for p, r in zip(preds, refs)])) for name, f in SCORERS.items()}
    out["accuracy"] = out[metric]
    out["macro_f1"] = answer_macro_f1(preds, refs) if metric == "exact" else out["token_f1"]
    return out
