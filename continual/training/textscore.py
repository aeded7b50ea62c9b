"""Scoring generated text against a reference: exact match, token F1, ROUGE-L and, for code,
edit similarity (pure functions).

Normalisation, the same for the three word scores (edit similarity compares code as written):
SQuAD's (lower case, punctuation and the articles a/an/the removed, whitespace collapsed), so "Positive." matches "positive" and "the cat" matches
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
from typing import Hashable, Sequence

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


def _lcs(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of two sequences (words, or characters for
    :func:`edit_sim`), by the bit-vector recurrence of Allison & Dix (1986), as Hyyrö (2004) writes
    it: bit i of ``v`` is 0 where the LCS of ``a[:i+1]`` and the part of ``b`` read so far grew.
    One big-integer step per item of ``b`` where the table is ``len(a) * len(b)`` Python steps: a
    code line or a meeting summary of a few hundred items took tens of milliseconds each."""
    if len(a) < len(b):
        a, b = b, a  # the bits over the longer, the steps over the shorter
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


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


# Py150's code (CodeXGLUE's token-level completion set, as TRACE ships it) stands literals in by
# placeholders: a bare one for a common literal, or one that carries the literal itself
_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)
_BARE_LITERALS = {"<NUM_LIT>": "0", "<STR_LIT>": "", "<CHAR_LIT>": ""}


def _literals(code: str) -> str:
    for mark, value in _BARE_LITERALS.items():
        code = code.replace(mark, value)
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_sim(pred: str, ref: str) -> float:
    """Edit similarity, the score of code completion (CodeXGLUE, Lu et al. 2021) that TRACE (Wang et
    al. 2023) gives Py150: ``1 - d / (|pred| + |ref|)`` over characters, ``d`` the edit distance
    with insertions and deletions only (a substitution costs two), which is ``2 LCS / (|pred| +
    |ref|)``; fuzzywuzzy's ``ratio`` / 100, which TRACE calls. Not normalised as the word scores
    are (case, punctuation and spacing inside a line are code); Py150's literal placeholders read
    as TRACE reads them (``<NUM_LIT>`` -> ``0``, ``<STR_LIT:x>`` -> ``x``). Departures: the two
    texts are stripped at their ends (a leading space comes from tokenising, not from the code),
    and the score is not rounded to a whole percent."""
    p, r = _literals(pred).strip(), _literals(ref).strip()
    if not p or not r:
        return 0.0  # nothing generated (or nothing to find) scores nothing, as for the others
    return 2 * _lcs(p, r) / (len(p) + len(r))


SCORERS = {"exact": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "edit_sim": edit_sim}


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
