"""Scoring generated text against a reference: exact match, token F1, ROUGE-L, for code edit
similarity, and for rewriting SARI, which judges an answer against its prompt too (pure functions).

Normalisation, the same for the three word scores (edit similarity compares code as written):
SQuAD's (lower case, punctuation and the articles a/an/the removed, whitespace collapsed), so
"Positive." matches "positive" and "the cat" matches "cat"; but a number keeps its sign and decimal
point ("-1" does not match "1", nor "3.5" "35"), as arithmetic answers need. Where that would erase
the whole text (an answer such as "A", "the" or "."), the text keeps its articles, and then its
punctuation: "A" is the word "a" and matches "a." but not "the", "." or an empty answer. An empty
answer (nothing generated) never scores. Exact match is what a verbalised classification task is
scored by (its answer is one label word); token F1 and ROUGE-L give partial credit to free text.
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


_WORDS = re.compile(r"\w+|[^\w\s]")


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 1.0  # nothing to keep, delete or add: that part is not wrong


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def sari(pred: str, ref: str, source: str) -> float:
    """SARI (Xu et al. 2016, "Optimizing Statistical Machine Translation for Text Simplification",
    Eqs. 4-7), the score TRACE gives 20Minuten: how well the answer keeps, deletes and adds the
    n-grams (n = 1..4) of the ``source`` against what the reference kept, deleted and added. Per
    n: keeping is scored by F1 over n-gram counts (kept in the answer ``min(#I, #O)``, rightly so
    ``min(#I, #O, #R)``), deleting by precision only (over ``#I - #O`` and ``#I - #R``, as counts),
    adding by F1 over sets (n-grams of the answer not in the source); the score is the mean of
    the three, each averaged over n. One reference (TRACE has one). Words are lower-cased, and
    punctuation marks are words of their own.

    Departures: HF ``evaluate``'s ``sari``, which TRACE loads, averages per-n-gram ratios where
    the paper sums counts (the two agree when no n-gram repeats), tokenises with sacreBLEU's
    ``13a`` and reports 0-100 (here 0-1, as every score); a part with nothing to keep, delete or
    add counts as right (1), as there; and an empty answer scores 0, as every score here, where
    SARI would credit it for deleting."""
    o = _WORDS.findall(pred.lower())
    if not o:
        return 0.0
    i, r = _WORDS.findall(source.lower()), _WORDS.findall(ref.lower())
    keep, delete, add = [], [], []
    for n in range(1, 5):
        gi, go, gr = _ngrams(i, n), _ngrams(o, n), _ngrams(r, n)
        kept, should_keep = gi & go, gi & gr
        right = sum((kept & should_keep).values())
        keep.append(_f1(_ratio(right, sum(kept.values())), _ratio(right, sum(should_keep.values()))))
        deleted, should_delete = gi - go, gi - gr
        delete.append(_ratio(sum((deleted & should_delete).values()), sum(deleted.values())))
        added, should_add = set(go) - set(gi), set(gr) - set(gi)
        good = len(added & should_add)
        add.append(_f1(_ratio(good, len(added)), _ratio(good, len(should_add))))
    return (float(np.mean(keep)) + float(np.mean(delete)) + float(np.mean(add))) / 3


SCORERS = {"exact": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "edit_sim": edit_sim}
# scores that judge an answer against its prompt too (what it kept, deleted and added)
SOURCE_SCORERS = {"sari": sari}
METRICS = (*SCORERS, *SOURCE_SCORERS)


def score_each(metric: str, preds: Sequence[str], refs: Sequence[str],
               sources: Sequence[str] | None = None) -> list[float]:
    """Each answer's score by ``metric``; ``sources`` (the prompts) for a metric that needs them."""
    if metric in SOURCE_SCORERS:
        if sources is None or len(sources) != len(preds):
            raise ValueError(f"metric {metric!r} scores an answer against its prompt: give the prompts (sources)")
        return [SOURCE_SCORERS[metric](p, r, s) for p, r, s in zip(preds, refs, sources)]
    return [SCORERS[metric](p, r) for p, r in zip(preds, refs)]


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


def score_texts(preds: Sequence[str], refs: Sequence[str], metric: str,
                sources: Sequence[str] | None = None) -> dict[str, float]:
    """Every text score of a prediction set (and the task's own, where it needs the prompts:
    ``sources``); ``accuracy`` is the task's own ``metric``, and ``macro_f1`` the label-word
    macro-F1 (exact tasks) or the mean token F1 (free text), so the accuracy and F1 matrices of a
    stream mean the same for generative and classification tasks."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    out = {name: float(np.mean(score_each(name, preds, refs))) for name in SCORERS}
    if metric in SOURCE_SCORERS:
        out[metric] = float(np.mean(score_each(metric, preds, refs, sources)))
    out["accuracy"] = out[metric]
    out["macro_f1"] = answer_macro_f1(preds, refs) if metric == "exact" else out["token_f1"]
    return out
