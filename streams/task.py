"""A task: named train/dev/test splits of labelled text, and a stream of tasks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Iterator

from datasets import Dataset, DatasetDict

from .catalog import DataError

SPLITS = ("train", "dev", "test")
# How a generative task's generated answers are scored against the target text (streams only names
# them; continual.training.textscore computes them): exact match after normalisation (a label
# word), token-level F1 (SQuAD's), ROUGE-L F (longest common subsequence; free text), edit
# similarity (characters; code), SARI (what a rewrite kept, deleted and added of its prompt).
METRICS = ("exact", "token_f1", "rouge_l", "edit_sim", "sari")
# What each task's score is called wherever it is shown (results.json, matrix CSVs, the report,
# MLflow): a classifier's accuracy, or the generative metric by its full name.
SCORE_NAMES = {"exact": "exact_match", "token_f1": "token_f1", "rouge_l": "rouge_l", "edit_sim": "edit_sim",
               "sari": "sari"}
KINDS = ("classification", "generative")
# A task name becomes a directory, an MLflow run name and a metric key: letters, digits, '_' and
# '-', starting with a letter or digit (the same rule adapters.DeltaModel applies to its tasks).
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def check_task_name(name: Any, where: str = "task") -> str:
    """``name`` if it is a valid task name, else a :class:`DataError` saying why (at stream load
    time, before any model is loaded)."""
    if not isinstance(name, str):
        raise DataError(f"{where}: the task name must be a string, got {type(name).__name__} {name!r}")
    if not TASK_NAME.match(name):
        raise DataError(f"{where}: invalid task name {name!r}: use letters, digits, '_' and '-', "
                        "starting with a letter or digit")
    return name


@dataclasses.dataclass
class Task:
    """One task of a stream: classification, or generative (text in, text out).

    A classification task's splits are ``datasets.Dataset``s with a ``text`` column (optionally
    ``text_pair``) and an integer ``label`` column indexing ``label_names``. A generative task's
    splits have ``text`` (the whole prompt) and ``target`` (the answer text) columns, and may keep
    a ``label`` column (a verbalised classification task: ``label_names`` are then its answer
    words); ``metric`` (one of :data:`METRICS`) says how a generated answer is scored.
    ``source`` records where the data came from (package, file, licence, split seed).
    ``max_length``: tokens per example for this task, where it needs other than the run's
    default (long BBC articles)."""

    name: str
    train: Dataset
    dev: Dataset
    test: Dataset
    label_names: list[str]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_length: int | None = None
    metric: str | None = None
    # A saved delta to start from instead of a fresh one (``delta:`` in a stream file): ``path``
    # (a PEFT adapter or a task checkpoint directory), ``train`` (False: used frozen, only the head
    # trains), ``check_base``, and ``sha256`` of its files (part of the fingerprint, so a changed
    # adapter is a different run)
    delta: dict[str, Any] | None = None
    # "classification" or "generative", decided here, once: from the splits' columns unless given
    # (and then checked against them); everything downstream reads it
    kind: str = ""

    def __post_init__(self) -> None:
        check_task_name(self.name)
        found = "generative" if "target" in self.train.column_names else "classification"
        if self.kind and self.kind not in KINDS:
            raise DataError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind and self.kind != found:
            raise DataError(f"task {self.name!r} is {self.kind}, but its splits are {found} "
                            "(a generative task has 'text' and 'target' columns)")
        self.kind = found
        self._check_names_and_text()
        if self.generative:
            self._check_generative()
            return
        if self.metric is not None:
            raise DataError(f"task {self.name!r}: a metric ({self.metric!r}) is for generative tasks (with a 'target' column)")
        for split in SPLITS:
            ds = getattr(self, split)
            if len(ds) == 0:
                raise DataError(f"task {self.name!r}: the {split} split is empty")
            if "label" not in ds.column_names:
                raise DataError(f"task {self.name!r}: the {split} split has no 'label' column")
            labels = list(ds["label"])
            kinds = sorted({type(v).__name__ for v in labels if not isinstance(v, int)})
            if kinds:  # a float id (1.5) passed the range check and was cut to a class; a string failed on '<='
                raise DataError(f"task {self.name!r}: {split} labels must be integer ids into label_names, found {kinds}")
            bad = [v for v in labels if not 0 <= v < len(self.label_names)]
            if bad:
                raise DataError(f"task {self.name!r}: {split} has label ids {sorted(set(bad))[:5]} outside 0..{len(self.label_names) - 1}")
        if len(set(self.train["label"])) < 2:
            # a cap keeps each label's share, so a small one can leave a two-label task with one
            n = len(self.train)
            raise DataError(f"task {self.name!r}: the training split ({n} example{'s' if n != 1 else ''}) has a single "
                            "label; a classifier needs two or more (if a cap cut them, raise --max-train or the task's "
                            "max_train)")

    def _check_names_and_text(self) -> None:
        """label_names a list of distinct strings (the agnostic matrix and verbalised answers match
        labels by name); every input a string (None failed later, in the tokenizer)."""
        names = self.label_names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise DataError(f"task {self.name!r}: label_names must be a list of strings, got {names!r}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"task {self.name!r}: label names {twice} are given more than once")
        self.label_names = list(names)
        for split in SPLITS:
            ds = getattr(self, split)
            if "text" not in ds.column_names:
                raise DataError(f"task {self.name!r}: the {split} split has no 'text' column")
            for column in ("text", "text_pair"):
                if column in ds.column_names:
                    bad = next((n for n, v in enumerate(ds[column], 1) if not isinstance(v, str)), None)
                    if bad is not None:
                        raise DataError(f"task {self.name!r}: {split} row {bad}, column {column!r}: not text")

    def _check_generative(self) -> None:
        if self.metric is None:
            self.metric = "exact"
        if self.metric not in METRICS:
            raise DataError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        for split in SPLITS:
            ds = getattr(self, split)
            if len(ds) == 0:
                raise DataError(f"task {self.name!r}: the {split} split is empty")
            for column in ("text", "target"):
                if column not in ds.column_names:
                    raise DataError(f"task {self.name!r}: the {split} split has no {column!r} column")
                empty = [n for n, v in enumerate(ds[column], 1) if not isinstance(v, str) or not v.strip()]
                if empty:
                    raise DataError(f"task {self.name!r}: {split} row {empty[0]}, column {column!r}: empty text")

    def seen_in_training(self) -> dict[str, int]:
        """How many dev and test examples have an input (``text``, and ``text_pair`` where there
        is one) that occurs verbatim in the training split: duplicates in the data, or a test file
        that is the training file. Their scores measure memory, not generalisation."""
        def inputs(ds: Dataset) -> list[tuple[str, ...]]:
            return list(zip(*(ds[c] for c in ("text", "text_pair") if c in ds.column_names)))

        train = set(inputs(self.train))
        return {split: sum(x in train for x in inputs(getattr(self, split))) for split in ("dev", "test")}

    @property
    def generative(self) -> bool:
        """Whether the task is text-to-text (``kind``)."""
        return self.kind == "generative"

    @property
    def score_name(self) -> str:
        """What the task is judged by: ``accuracy``, or ``exact_match`` / ``token_f1`` / ``rouge_l``
        / ``edit_sim`` / ``sari``."""
        return SCORE_NAMES[self.metric] if self.generative else "accuracy"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def splits(self) -> DatasetDict:
        return DatasetDict(train=self.train, dev=self.dev, test=self.test)

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}

    def fingerprint(self) -> str:
        """SHA-256 of the label names and every split's rows: equal data, equal fingerprint."""
        h = hashlib.sha256(json.dumps(self.label_names).encode())
        if self.generative:  # (classification fingerprints stay what they were: saved runs resume)
            h.update(f"metric={self.metric}".encode())
        if self.delta is not None:  # likewise: only tasks that start from a saved delta hash it
            h.update(json.dumps({k: self.delta[k] for k in ("train", "sha256")}, sort_keys=True).encode())
        for split in SPLITS:
            ds = getattr(self, split)
            h.update(split.encode())
            for column in sorted(c for c in ds.column_names if c in ("text", "text_pair", "label", "target")):
                h.update(column.encode())
                h.update(json.dumps(list(ds[column]), ensure_ascii=False).encode())
        return h.hexdigest()


class TaskStream:
    """An ordered sequence of tasks with distinct names. ``spec`` records how it was built."""

    def __init__(self, name: str, tasks: list[Task], spec: dict[str, Any] | None = None) -> None:
        if not tasks:
            raise DataError(f"stream {name!r} has no tasks")
        seen: dict[str, int] = {}
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise DataError(f"stream {name!r}: task {i + 1} is a {type(t).__name__}, not a streams.Task")
            if t.name in seen:
                raise DataError(f"stream {name!r}: task name {t.name!r} appears twice (tasks {seen[t.name] + 1} and {i + 1})")
            seen[t.name] = i
        self.name, self.tasks, self.spec = name, list(tasks), dict(spec or {})

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, key: int | str) -> Task:
        if isinstance(key, str):
            for t in self.tasks:
                if t.name == key:
                    return t
            raise KeyError(f"stream {self.name!r} has no task {key!r}; tasks: {', '.join(self.names)}")
        return self.tasks[key]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def fingerprints(self) -> dict[str, str]:
        return {t.name: t.fingerprint() for t in self.tasks}

    def __repr__(self) -> str:
        return f"TaskStream({self.name!r}, {self.names})"
