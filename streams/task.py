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
    """One classification task of a stream.

    Each split is a ``datasets.Dataset`` with a ``text`` column (optionally ``text_pair``) and an
    integer ``label`` column indexing ``label_names``. ``source`` records where the data came from
    (package, file, licence, split seed). ``max_length``: tokens per example for this task, where
    it needs other than the run's default (long BBC articles)."""

    name: str
    train: Dataset
    dev: Dataset
    test: Dataset
    label_names: list[str]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_length: int | None = None

    def __post_init__(self) -> None:
        check_task_name(self.name)
        for split in SPLITS:
            ds = getattr(self, split)
            if len(ds) == 0:
                raise DataError(f"task {self.name!r}: the {split} split is empty")
            labels = list(ds["label"])
            bad = [v for v in labels if not 0 <= v < len(self.label_names)]
            if bad:
                raise DataError(f"task {self.name!r}: {split} has label ids {sorted(set(bad))[:5]} outside 0..{len(self.label_names) - 1}")
        if len(set(self.train["label"])) < 2:
            raise DataError(f"task {self.name!r}: the training split has a single label; a classifier needs two or more")

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
        for split in SPLITS:
            ds = getattr(self, split)
            h.update(split.encode())
            for column in sorted(c for c in ds.column_names if c in ("text", "text_pair", "label")):
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
