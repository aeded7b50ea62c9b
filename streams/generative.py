"""Generative (text-to-text) tasks from the shipped data: verbalised classification, and headlines.

What continual instruction tuning and the 5- and 15-task text benchmarks run: every task is a
prompt and an answer in words, so one language model answers all of them and a task's delta is
scored by what it generates.

- :func:`verbalize` turns a classification task into a generative one: the text goes into the
  task's instruction template and the label becomes its answer word ("positive", "number", ...),
  scored by exact match. The label column is kept (routers build per-label prototypes from it).
- ``headline``: a BBC article's body in, its real headline out (each file's first line), scored by
  ROUGE-L: free text.

The instruction comes *after* the text, so that truncating a long text from the left never cuts
the question; long texts are first cut to ``max_words`` words.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from datasets import Dataset

from .catalog import BBC_META, DataError, _meta, bbc_articles, cap_indices, load_task_data, stratified_split
from .task import Task


@dataclasses.dataclass(frozen=True)
class Verbalizer:
    """How a labelled text becomes a prompt and an answer: ``template`` holds ``{text}``;
    ``words`` maps each label name to its answer (default: the label name itself)."""

    template: str
    words: dict[str, str] = dataclasses.field(default_factory=dict)
    max_words: int | None = None

    def prompt(self, text: str) -> str:
        if self.max_words is not None:
            text = " ".join(text.split()[: self.max_words])
        return self.template.format(text=text)

    def answers(self, label_names: Sequence[str]) -> list[str]:
        return [self.words.get(n, n) for n in label_names]


_SENTIMENT = {"neg": "negative", "pos": "positive"}
VERBALIZERS: dict[str, Verbalizer] = {
    "movie": Verbalizer("Review: {text}\nIs this movie review positive or negative?\nAnswer:", _SENTIMENT),
    "amazon": Verbalizer("Review: {text}\nIs this product review positive or negative?\nAnswer:", _SENTIMENT),
    "tweets": Verbalizer("Tweet: {text}\nIs this tweet positive or negative?\nAnswer:", _SENTIMENT),
    "nyt": Verbalizer("Editorial: {text}\nIs this editorial positive or negative?\nAnswer:", _SENTIMENT),
    "bbc": Verbalizer("Article: {text}\nWhich topic is this article about: business, entertainment, politics, sport "
                      "or tech?\nAnswer:", max_words=80),
    "trec": Verbalizer("Question: {text}\nWhat does this question ask for: a description, an entity, an abbreviation, "
                       "a human, a number or a location?\nAnswer:",
                       {"DESC": "description", "ENTY": "entity", "ABBR": "abbreviation", "HUM": "human",
                        "NUM": "number", "LOC": "location"}),
    "sms": Verbalizer("Message: {text}\nIs this text message spam or ham?\nAnswer:"),
    "disaster": Verbalizer("Tweet: {text}\nDoes this tweet report a real disaster, yes or no?\nAnswer:",
                           {"other": "no", "disaster": "yes"}),
}
HEADLINE = Verbalizer("Article: {text}\nWrite a headline for this article.\nHeadline:", max_words=60)

GENERATIVE_STREAMS: dict[str, tuple[str, ...]] = {
    "generative": ("movie", "trec", "sms", "headline"),
    # the shape of the standard 5-task continual text benchmark (Zhang et al. 2015's sets as used by
    # de Masson d'Autume et al. 2019 and O-LoRA: Amazon and Yelp sentiment, AG News topic, Yahoo
    # question topic, DBpedia entity type), from the shipped data: sentiment in two domains, a news
    # topic, a question type, and disaster tweets in place of DBpedia; all answered in words
    "standard-5": ("amazon", "bbc", "trec", "movie", "disaster"),
}
"""Built-in generative streams (verbalised catalogued data sets, and ``headline``), in order."""


def verbalize(task: Task, verbalizer: Verbalizer | None = None, name: str | None = None) -> Task:
    """The generative form of a classification task: prompt = template(text), target = the label's
    answer word (exact match). ``verbalizer`` defaults to the built-in one of the task's data set."""
    if task.generative:
        raise DataError(f"task {task.name!r} is already generative")
    dataset = task.source.get("dataset", task.name)
    verbalizer = verbalizer or VERBALIZERS.get(dataset)
    if verbalizer is None:
        raise DataError(f"no built-in verbalizer for {dataset!r} (known: {', '.join(VERBALIZERS)}); give one "
                        "(a template with {{text}} and answer words)")
    if "text_pair" in task.train.column_names:
        raise DataError(f"task {task.name!r} has a text pair; give a template for it in a YAML stream ('target_column')")
    words = verbalizer.answers(task.label_names)
    if len(set(words)) != len(words):
        raise DataError(f"task {task.name!r}: two labels share an answer word ({words}); exact match could not tell them apart")

    def convert(ds: Dataset) -> Dataset:
        labels = list(ds["label"])
        return Dataset.from_dict({"text": [verbalizer.prompt(t) for t in ds["text"]],
                                  "target": [words[i] for i in labels], "label": labels})

    source = {**task.source, "verbalized": {"template": verbalizer.template, "answers": words}}
    return Task(name or task.name, convert(task.train), convert(task.dev), convert(task.test), words, source,
                task.max_length, metric="exact")


def headline_task(seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
                  dev_fraction: float = 0.1, test_fraction: float = 0.1, name: str = "headline") -> Task:
    """BBC article body -> its headline (ROUGE-L). Splits seeded and stratified by topic."""
    titles, bodies, topics, _ = bbc_articles()
    labels = np.asarray(topics)
    parts = stratified_split(labels, (1 - dev_fraction - test_fraction, dev_fraction, test_fraction), seed)
    caps = (max_train, max_eval, max_eval)
    splits = []
    for idx, cap, split in zip(parts, caps, ("train", "dev", "test")):
        idx = cap_indices(idx, labels, cap, seed, f"{name} {split}")
        splits.append(Dataset.from_dict({"text": [HEADLINE.prompt(bodies[i]) for i in idx],
                                         "target": [titles[i] for i in idx]}))
    source = {**_meta(*BBC_META), "split_seed": seed, "dataset": "headline", "target": "the article's first line"}
    return Task(name, *splits, [], source, None, metric="rouge_l")


def generative_task(name: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
                    dev_fraction: float = 0.1, test_fraction: float = 0.1, task_name: str | None = None) -> Task:
    """A built-in generative task: ``headline``, or a catalogued data set verbalised."""
    if name == "headline":
        return headline_task(seed, max_train, max_eval, dev_fraction, test_fraction, task_name or name)
    if name not in VERBALIZERS:
        raise DataError(f"unknown generative task {name!r}; known: headline, {', '.join(VERBALIZERS)}")
    data, src = load_task_data(name, seed, dev_fraction, test_fraction, max_train, max_eval)
    source = {**src.source, "split_seed": seed, "dataset": name}
    task = Task(task_name or name, data["train"], data["dev"], data["test"], src.label_names, source)
    return verbalize(task)
