"""Building task streams: the built-in ones and a user's YAML file.

A stream YAML file::

    name: my-stream              # optional (default: the file's name)
    seed: 0                      # split seed (optional)
    max_train: 2000              # per-task caps (optional)
    max_eval: 300
    tasks:
      - name: reviews
        train: data/reviews.csv  # path relative to this file; CSV, TSV, JSONL or parquet
        test: data/reviews_test.csv      # optional; dev/test are split off train when missing
        text_column: text                # defaults: text / label
        label_column: label
        text_pair_column: hypothesis     # optional second text
        label_names: [neg, pos]          # optional; default: the sorted training labels
        encoding: utf-8                  # optional
      - name: questions
        source: trec                     # a built-in data set (``continual list``)
      - name: imdb
        hub: imdb                        # a HF hub data set (needs network access)
        hub_splits: {train: train, test: test}
      - name: topics-as-text             # generative (text-to-text) forms, for decoder backbones:
        source: bbc                      #   a built-in data set verbalised (its label -> a word)
        generative: true
        answers: {tech: technology}      #   optional: answer words (default: the built-in ones)
      - name: summaries
        train: data/pairs.jsonl          #   or a file with a target text column
        target_column: summary
        template: "{text}\nSummary:"     #   optional: the prompt around the text
        metric: rouge_l                  #   exact (default) | token_f1 | rouge_l | edit_sim | sari
      - name: reviews-again              # any task may start from a saved delta instead of a fresh one:
        source: amazon                   #   a PEFT adapter directory (LoRA, (IA)^3, prompt tuning) or a
        delta: adapters/reviews-lora     #   task checkpoint of this tool; trained further, or, with
        # delta: {path: adapters/reviews-lora, train: false, check_base: true}   frozen (the head trains)

Splits that a data set lacks are cut from its training data: seeded and stratified.

The published benchmarks' folder layouts are streams too: ``cl-benchmark:PATH:order=N`` (O-LoRA /
SAPT's CL_Benchmark) and ``trace:PATH`` (TRACE); see :mod:`streams.benchmarks`.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from .catalog import SOURCES, DataError, cap_indices, load_task_data, stratified_split
from .benchmarks import PREFIXES, plan
from .files import encode_labels, extract, extract_targets, label_vocabulary, load_hub, read_table
from .generative import GENERATIVE_STREAMS, VERBALIZERS, Verbalizer, generative_task, verbalize
from .safe_yaml import load_yaml
from .task import METRICS, SPLITS, Task, TaskStream, check_task_name

STREAMS: dict[str, tuple[str, ...]] = {
    "default": ("movie", "bbc", "trec", "sms", "disaster", "amazon"),
    "sentiment-domains": ("movie", "amazon", "tweets", "nyt"),
}
"""Built-in streams: catalogued real data sets (shared/data-catalog.md), in this order."""

# Tokens per example where a task needs more than the run's default: BBC articles are long.
TASK_MAX_LENGTH = {"bbc": 128}

_STREAM_KEYS = {"name", "seed", "max_train", "max_eval", "dev_fraction", "test_fraction", "tasks"}
_TASK_KEYS = {"name", "source", "train", "dev", "test", "hub", "hub_config", "hub_splits", "text_column",
              "label_column", "text_pair_column", "label_names", "encoding", "max_train", "max_eval", "max_length",
              "generative", "answers", "target_column", "template", "metric", "delta"}


def _labels(ds: Dataset) -> np.ndarray:
    """Labels to stratify on (one class for a free-text task)."""
    return np.asarray(list(ds["label"])) if "label" in ds.column_names else np.zeros(len(ds), dtype=int)


def _cap(ds: Dataset, cap: int | None, seed: int) -> Dataset:
    if cap is None or len(ds) <= cap:
        return ds
    keep = cap_indices(np.arange(len(ds)), _labels(ds), cap, seed)
    return ds.select(sorted(keep.tolist()))


def check_caps(max_train: Any, max_eval: Any, where: str) -> None:
    """Caps are None (no cap) or whole numbers >= 1: a negative cap would slice from the end."""
    for key, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{where}: {key} must be a whole number >= 1 (or absent: no cap), got {value!r}")


def builtin_task(name: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
                 dev_fraction: float = 0.1, test_fraction: float = 0.1, task_name: str | None = None) -> Task:
    """A catalogued data set as a :class:`Task` (seeded stratified splits, capped)."""
    data, src = load_task_data(name, seed, dev_fraction, test_fraction, max_train, max_eval)
    source = {**src.source, "split_seed": seed, "dataset": name}
    return Task(task_name or name, data["train"], data["dev"], data["test"], src.label_names, source,
                TASK_MAX_LENGTH.get(name))


def builtin_stream(name: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None) -> TaskStream:
    if name in GENERATIVE_STREAMS:
        tasks = [generative_task(t, seed, max_train, max_eval) for t in GENERATIVE_STREAMS[name]]
        return TaskStream(name, tasks, {"stream": name, "seed": seed, "max_train": max_train, "max_eval": max_eval})
    if name not in STREAMS:
        known = ", ".join([*STREAMS, *GENERATIVE_STREAMS])
        raise DataError(f"unknown stream {name!r}; built-in streams: {known} (or give a YAML file)")
    tasks = [builtin_task(t, seed, max_train, max_eval) for t in STREAMS[name]]
    return TaskStream(name, tasks, {"stream": name, "seed": seed, "max_train": max_train, "max_eval": max_eval})


def load_stream(spec: str | Path, seed: int = 0, max_train: int | None = None, max_eval: int | None = None) -> TaskStream:
    """A built-in stream by name, or a user stream from a YAML file.

    ``seed``, ``max_train``, ``max_eval`` apply to built-in streams; for a YAML stream they are the
    defaults that the file's own settings override per stream and per task."""
    check_caps(max_train, max_eval, "load_stream")
    if str(spec).startswith(PREFIXES):  # a published benchmark's folder layout
        return benchmark_stream(str(spec), seed, max_train, max_eval)
    if str(spec) in STREAMS or str(spec) in GENERATIVE_STREAMS:
        return builtin_stream(str(spec), seed, max_train, max_eval)
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_symlink() or path.exists():
        return stream_from_yaml(path, seed, max_train, max_eval)
    known = ", ".join([*STREAMS, *GENERATIVE_STREAMS])
    raise DataError(f"unknown stream {str(spec)!r}: not a built-in stream ({known}) and no such file")


def benchmark_stream(spec: str, seed: int = 0, max_train: int | None = None, max_eval: int | None = None) -> TaskStream:
    """A published benchmark's folder as a stream (``cl-benchmark:PATH:order=N``, ``trace:PATH``;
    see :mod:`streams.benchmarks`), read with the file-task readers of a YAML stream."""
    name, identity, entries = plan(spec)
    settings = {"seed": seed, "max_train": max_train, "max_eval": max_eval, "dev_fraction": 0.1, "test_fraction": 0.1}
    tasks = [_yaml_generative(entry, folder, settings, where, max_train, max_eval) if "target_column" in entry
             else _yaml_data_task(entry, folder, settings, where) for entry, folder, where in entries]
    return TaskStream(name, tasks, {**identity, **settings})


def stream_from_yaml(path: str | Path, seed: int = 0, max_train: int | None = None, max_eval: int | None = None,
                     origin: Path | None = None, spec: dict[str, Any] | None = None) -> TaskStream:
    """A stream file, or a run's record of its stream (see :func:`stream_from_record`). ``spec``:
    the file's content, read from ``origin`` (default: ``path``; relative data paths start there)."""
    path = Path(path)
    spec = load_yaml(path) if spec is None else spec
    if isinstance(spec, dict) and "tasks_resolved" in spec:
        return stream_from_record(path, spec)
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise DataError(f"{path}: expected a mapping with a non-empty 'tasks:' list")
    _check_keys(spec, _STREAM_KEYS, f"{path}")
    defaults = {"seed": seed, "max_train": max_train, "max_eval": max_eval, "dev_fraction": 0.1, "test_fraction": 0.1}
    settings = {k: spec.get(k, v) for k, v in defaults.items()}
    _check_settings(spec, settings, f"{path}")
    names: dict[str, int] = {}
    for i, entry in enumerate(spec["tasks"], 1):
        if not isinstance(entry, dict) or "name" not in entry:
            raise DataError(f"{path}: task {i} must be a mapping with a 'name'")
        check_task_name(entry["name"], f"{path}: task {i}")
        if entry["name"] in names:
            raise DataError(f"{path}: task name {entry['name']!r} appears twice (tasks {names[entry['name']]} and {i})")
        names[entry["name"]] = i
    origin = origin or path.resolve()
    tasks = [_yaml_task(entry, origin.parent, settings, f"{path}: task {entry['name']!r}") for entry in spec["tasks"]]
    return TaskStream(str(spec.get("name", path.stem)), tasks, {"file": str(origin), **spec, **settings})


def stream_from_record(path: Path, record: dict[str, Any]) -> TaskStream:
    """The ``stream.yaml`` a run writes beside its results, read back as the stream it ran: the
    same built-in stream, benchmark folder or stream file (its data paths taken from where that
    file was), with the recorded seed and caps; each task's data must still hash to the recorded
    fingerprint (a changed file would give another run under the same name)."""
    if not isinstance(record["tasks_resolved"], list):
        raise DataError(f"{path}: tasks_resolved must be the list a run writes, got {type(record['tasks_resolved']).__name__}")
    settings = {k: record.get(k) for k in ("seed", "max_train", "max_eval")}
    if "root" in record:  # a benchmark folder: its spec string again
        options = "".join(f":{k}" if v is True else f":{k}={v}" for k, v in record.items() if k in ("order", "tasks", "generative"))
        stream = benchmark_stream(f"{record['stream']}:{record['root']}{options}", **settings)
    elif "stream" in record:
        stream = builtin_stream(str(record["stream"]), **settings)
    elif isinstance(record.get("file"), str):
        spec = {k: v for k, v in record.items() if k not in ("file", "tasks_resolved")}
        stream = stream_from_yaml(path, origin=Path(record["file"]), spec=spec)
    else:
        raise DataError(f"{path}: a run's stream record names no stream ('stream', 'root' or 'file')")
    recorded = {t.get("name"): t.get("fingerprint") for t in record["tasks_resolved"] if isinstance(t, dict)}
    for name, fingerprint in stream.fingerprints().items():
        if recorded.get(name) != fingerprint:
            raise DataError(f"{path}: task {name!r}: its data differ from those of the run this file records (its "
                            "files or data package changed since); restore them, or run the stream file itself")
    return stream


def _check_settings(spec: dict[str, Any], settings: dict[str, Any], where: str) -> None:
    """The stream-wide settings of a stream file, before any data is read: a fraction outside (0, 1)
    had split the data with a negative share and trained on it; a text seed failed deep in numpy."""
    if "name" in spec and (not isinstance(spec["name"], str) or not spec["name"].strip()):
        raise DataError(f"{where}: name must be a text, got {spec['name']!r}")
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise DataError(f"{where}: seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
    check_caps(settings["max_train"], settings["max_eval"], where)  # (named here, not as the first task's key)
    for key in ("dev_fraction", "test_fraction"):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise DataError(f"{where}: {key} must be a number between 0 and 1 (the share of a task's training file "
                            f"split off when it has no '{key[:-9]}:' file), got {v!r}")
    if settings["dev_fraction"] + settings["test_fraction"] >= 1:
        raise DataError(f"{where}: dev_fraction + test_fraction is {settings['dev_fraction'] + settings['test_fraction']:g}, "
                        "which leaves nothing to train on; keep their sum below 1")


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _yaml_task(entry: dict[str, Any], root: Path, settings: dict[str, Any], where: str) -> Task:
    _check_keys(entry, _TASK_KEYS, where)
    _check_entry(entry, where)
    task = _yaml_data_task(entry, root, settings, where)
    if "delta" in entry:
        task.delta = start_delta(entry["delta"], root, where)
    return task


def _check_entry(entry: dict[str, Any], where: str) -> None:
    """Values of a task entry whose wrong type had surfaced as a traceback (a text max_length or
    encoding) or been read otherwise without a word (max_length 0 as "the run's"; label_names
    given as one text, split into its letters)."""
    length = entry.get("max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise DataError(f"{where}: max_length must be a whole number >= 1 (or absent: the run's), got {length!r}")
    names = entry.get("label_names")
    if names is not None and (not isinstance(names, list) or not names or
                              any(isinstance(n, (list, dict)) or n is None for n in names)):
        raise DataError(f"{where}: label_names must be a non-empty list of names, e.g. [neg, pos], got {names!r}")
    if not isinstance(entry.get("encoding", ""), str):
        raise DataError(f"{where}: encoding must be a codec name such as utf-8 or latin-1, got {entry['encoding']!r}")


# the files that make a saved delta: a PEFT adapter's, or a task checkpoint's (adapters.checkpoint)
DELTA_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "delta_continual.json",
               "delta.json", "delta.safetensors")


def start_delta(spec: Any, root: Path, where: str) -> dict[str, Any]:
    """A task's ``delta:`` (a path, or ``{path, train, check_base}``) checked and fingerprinted: the
    directory must hold a PEFT adapter or a task checkpoint; its files' SHA-256 are recorded."""
    spec = {"path": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise DataError(f"{where}: 'delta' must be a path, or a mapping with a 'path' (and optional 'train', 'check_base')")
    _check_keys(spec, {"path", "train", "check_base"}, f"{where}: delta")
    for key in ("train", "check_base"):
        if not isinstance(spec.get(key, True), bool):
            raise DataError(f"{where}: delta {key} must be true or false, got {spec[key]!r}")
    path = (root / spec["path"]).expanduser().resolve()
    if not (path / "adapter_config.json").is_file() and not (path / "delta.json").is_file():
        raise DataError(f"{where}: delta {spec['path']!r}: {path} holds no PEFT adapter (adapter_config.json) "
                        "and no task checkpoint (delta.json)")
    digests = {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in DELTA_FILES if (path / f).is_file()}
    return {"path": str(path), "train": spec.get("train", True), "check_base": spec.get("check_base", True), "sha256": digests}


def _yaml_data_task(entry: dict[str, Any], root: Path, settings: dict[str, Any], where: str) -> Task:
    name = str(entry["name"])
    seed = int(settings["seed"])
    max_train, max_eval = entry.get("max_train", settings["max_train"]), entry.get("max_eval", settings["max_eval"])
    check_caps(max_train, max_eval, where)
    kinds = [k for k in ("source", "train", "hub") if k in entry]
    if len(kinds) != 1:
        raise DataError(f"{where}: give exactly one of 'source' (built-in data set), 'train' (a file) or 'hub'")
    if "source" in entry:
        if entry["source"] not in SOURCES:
            raise DataError(f"{where}: unknown source {entry['source']!r}; built-in data sets: {', '.join(SOURCES)}")
        task = builtin_task(entry["source"], seed, max_train, max_eval, settings["dev_fraction"],
                            settings["test_fraction"], task_name=name)
        task.max_length = entry.get("max_length", task.max_length)
        verbal = "template" in entry or "answers" in entry
        if entry.get("metric", "exact") != "exact" or (entry.get("generative") is False and verbal):
            raise DataError(f"{where}: a built-in source made generative is scored by exact match of its answer word; "
                            "'metric' applies to file tasks with a 'target_column', and 'template' / 'answers' need "
                            "'generative' left true")
        if entry.get("generative") or verbal:
            return verbalize(task, _verbalizer(entry, VERBALIZERS.get(entry["source"]), where))
        return task
    if "target_column" in entry:
        return _yaml_generative(entry, root, settings, where, max_train, max_eval)
    stray = [k for k in ("generative", "template", "answers", "metric") if k in entry]
    if stray:  # dropped, the task would silently train as classification
        raise DataError(f"{where}: {', '.join(map(repr, stray))} make{'s' if len(stray) == 1 else ''} a generative task, which needs the column that "
                        "holds its answers ('target_column:'); without it the file's labels make a classification task")

    text_col, label_col = entry.get("text_column", "text"), entry.get("label_column", "label")
    pair_col = entry.get("text_pair_column")
    if "hub" in entry:
        frames = load_hub(entry["hub"], entry.get("hub_config"), name)
        mapping = entry.get("hub_splits") or {s: s for s in SPLITS if s in frames}
        if "dev" not in mapping and "validation" in frames:
            mapping["dev"] = "validation"
        tables = {}
        for split, hub_split in mapping.items():
            if hub_split not in frames:
                raise DataError(f"{where}: hub data set {entry['hub']!r} has no split {hub_split!r} (has: {', '.join(frames)})")
            tables[split] = (frames[hub_split], f"{where} (hub {entry['hub']}, split {hub_split})")
        origin = {"hub": entry["hub"], "hub_config": entry.get("hub_config")}
    else:
        tables = {}
        for split in SPLITS:
            if split in entry:
                file = (root / str(entry[split])).resolve()
                tables[split] = (read_table(file, entry.get("encoding", "utf-8")), str(file))
        origin = {s: tables[s][1] for s in tables}
    if "train" not in tables:
        raise DataError(f"{where}: no training data ('train:' file or hub split)")

    columns, raw_labels = {}, {}
    for split, (frame, file) in tables.items():
        columns[split], raw_labels[split] = extract(frame, file, text_col, label_col, pair_col)
    names = label_vocabulary(raw_labels["train"], entry.get("label_names"))
    ids = {split: encode_labels(raw_labels[split], names, tables[split][1], label_col, "label_names" in entry)
           for split in tables}
    if "label_names" in entry:  # given names: the training data must still hold every label it is tested on
        seen = set(ids["train"])
        for split in tables:
            for n, v in enumerate(ids[split], 1):
                if v not in seen:
                    raise DataError(f"{tables[split][1]}: row {n}, column {label_col!r}: label {names[v]!r} "
                                    f"never occurs in the training data")
    full = {split: Dataset.from_dict({**columns[split], "label": ids[split]}) for split in tables}

    splits, missing = _complete_splits(full, settings, seed, where, max_train, max_eval)
    source = {**origin, "split_seed": seed, "cut_from_train": ",".join(missing)}
    return Task(name, splits["train"], splits["dev"], splits["test"], names, source, entry.get("max_length"))


def _complete_splits(full: dict[str, Dataset], settings: dict[str, Any], seed: int, where: str,
                     max_train: int | None, max_eval: int | None) -> tuple[dict[str, Dataset], list[str]]:
    """Missing dev/test cut from train (seeded, stratified by label where there is one), then
    every split capped; also says which splits were cut."""
    missing = [s for s in ("dev", "test") if s not in full]
    if missing:
        fractions = {"dev": settings["dev_fraction"], "test": settings["test_fraction"]}
        fr = [fractions[s] for s in missing]
        train = full["train"]
        parts = stratified_split(_labels(train), (1 - sum(fr), *fr), seed)
        full["train"] = train.select(sorted(parts[0].tolist()))
        for split, idx in zip(missing, parts[1:]):
            full[split] = train.select(sorted(idx.tolist()))
            if len(full[split]) == 0:
                raise DataError(f"{where}: too few rows ({len(train)}) to split off a {split} set; give a '{split}:' file")
    caps = {"train": max_train, "dev": max_eval, "test": max_eval}
    return {s: _cap(full[s], caps[s], seed) for s in SPLITS}, missing


def _verbalizer(entry: dict[str, Any], default: Verbalizer | None, where: str) -> Verbalizer:
    template = entry.get("template", default.template if default else None)
    if not isinstance(template, str) or "{text}" not in template:
        raise DataError(f"{where}: 'template' must be a string holding {{text}}, got {template!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # a lone "{" or "}"
        raise DataError(f"{where}: 'template' {template!r} is malformed ({e}); write a literal brace as {{{{ or }}}}") from None
    if fields != {"text"}:
        raise DataError(f"{where}: 'template' may hold only the placeholder {{text}}, not "
                        f"{', '.join('{' + f + '}' for f in sorted(fields - {'text'}))}; write a literal brace as {{{{ or }}}}")
    answers = entry.get("answers", {})
    if not isinstance(answers, dict):
        raise DataError(f"{where}: 'answers' must map label names to answer words, got {answers!r}")
    words = {**(default.words if default else {}), **{str(k): str(v) for k, v in answers.items()}}
    return Verbalizer(template, words, default.max_words if default else None)


def _yaml_generative(entry: dict[str, Any], root: Path, settings: dict[str, Any], where: str,
                     max_train: int | None, max_eval: int | None) -> Task:
    """A text-to-text task from files: a text column (formatted by ``template``) and a target column."""
    for key in ("label_column", "label_names", "text_pair_column", "hub", "generative", "answers"):
        if key in entry:
            raise DataError(f"{where}: {key!r} does not apply to a task with a 'target_column'")
    if entry.get("metric", "exact") not in METRICS:  # named with the file, before its data are read
        raise DataError(f"{where}: unknown metric {entry['metric']!r}; known: {', '.join(METRICS)}")
    verbalizer = _verbalizer({"template": "{text}", **entry}, None, where)
    text_col, target_col, seed = entry.get("text_column", "text"), entry["target_column"], int(settings["seed"])
    full = {}
    for split in SPLITS:
        if split in entry:
            file = (root / str(entry[split])).resolve()
            texts, targets = extract_targets(read_table(file, entry.get("encoding", "utf-8")), str(file), text_col, target_col)
            full[split] = Dataset.from_dict({"text": [verbalizer.prompt(t) for t in texts], "target": targets})
    splits, missing = _complete_splits(full, settings, seed, where, max_train, max_eval)
    source = {**{s: str((root / str(entry[s])).resolve()) for s in SPLITS if s in entry}, "split_seed": seed,
              "cut_from_train": ",".join(missing), "template": verbalizer.template}
    return Task(entry["name"], splits["train"], splits["dev"], splits["test"], [], source, entry.get("max_length"),
                metric=entry.get("metric", "exact"))
