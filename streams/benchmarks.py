"""The published continual-learning benchmark layouts as streams, for a user who has the data.

``cl-benchmark:PATH[:order=N][:generative][:tasks=A,B,...]`` reads the ``CL_Benchmark`` folder of
the O-LoRA / SAPT code: ``PATH/<category>/<dataset>/{train,dev,test}.json``, each a JSON array of
``{"sentence": ..., "label": ...}``, and ``labels.json`` (the label names). Orders 1-3 are the
standard benchmark's 4 tasks, 4-6 the long benchmark's 15, in the order of O-LoRA's Table 7
(orders 4-6 first used by Progressive Prompts). By default a task is classification over
``labels.json``'s names (an encoder's head); with ``:generative`` it is text in, label name out
(exact match), the prompt being the category's instruction, the options, and the sentence (our
wording, written here, not the papers').

``trace:PATH[:order=1][:tasks=A,B,...]`` reads TRACE's layout: ``PATH/<dataset>/{train,eval,test}.json``,
each a JSON array of ``{"prompt": ..., "answer": ...}``; always generative. Each data set is scored
with TRACE's metric: exact match for the classification and arithmetic sets, ROUGE-L for
MeetingBank, edit similarity for Py150 and SARI for 20Minuten (see continual.training.textscore for
where our scores depart from the packages TRACE calls).

Missing dev splits are cut from train (seeded), as for every file task; ``--max-train`` and
``--max-eval`` cap every split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .catalog import DataError
from .task import check_task_name

CL_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia", "agnews",
        "MultiRC", "yahoo"),
    5: ("MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yelp",
        "amazon", "yahoo"),
    6: ("yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo", "MultiRC",
        "BoolQA", "WiC"),
}
# what each CL_Benchmark category asks (our wording)
INSTRUCTIONS = {
    "SC": "Give the sentiment of the text.",
    "TC": "Give the topic of the text.",
    "NLI": "Say how sentence 2 relates to sentence 1.",
    "QQP": "Say whether the two questions mean the same.",
    "WiC": "Say whether the word has the same sense in both sentences.",
    "MultiRC": "Say whether the candidate answer to the question about the passage is true.",
    "COPA": "Pick the more plausible alternative.",
    "BoolQA": "Say whether the statement about the passage is true.",
}
TRACE_ORDERS: dict[int, tuple[str, ...]] = {
    1: ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"),
}
TRACE_METRICS = {"MeetingBank": "rouge_l", "Py150": "edit_sim", "20Minuten": "sari"}
PREFIXES = ("cl-benchmark:", "trace:")


def parse(spec: str) -> tuple[str, Path, dict[str, Any]]:
    """``layout:PATH[:key=value|:flag]...`` -> (layout, path, options); options are peeled off the
    right, so PATH may itself hold ':' (not followed by a known option)."""
    layout, rest = spec.split(":", 1)
    options: dict[str, Any] = {}
    parts = rest.split(":")
    while len(parts) > 1 and (parts[-1] == "generative" or parts[-1].split("=", 1)[0] in ("order", "tasks")):
        key, _, value = parts.pop().partition("=")
        if key in options:
            raise DataError(f"stream {spec!r}: {key!r} given twice")
        options[key] = value if key != "generative" else True
    if not ":".join(parts):
        example = "cl-benchmark:/data/CL_Benchmark:order=1" if layout == "cl-benchmark" else f"{layout}:/data/TRACE"
        raise DataError(f"stream {spec!r}: give the folder, e.g. {example}")
    return layout, Path(":".join(parts)).expanduser(), options


def task_names(spec: str, options: dict[str, Any], orders: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    if "tasks" in options and "order" in options:
        raise DataError(f"stream {spec!r}: give 'order=' or 'tasks=', not both")
    if "tasks" in options:
        names = tuple(n for n in options["tasks"].split(",") if n)
        if not names or len(set(names)) != len(names):
            raise DataError(f"stream {spec!r}: 'tasks=' must list distinct data set names, e.g. tasks=dbpedia,amazon")
        for n in names:  # each becomes a task name (a directory, a metric key)
            check_task_name(n, f"stream {spec!r}")
        return names
    raw = options.get("order", "1")
    if not raw.isdigit() or int(raw) not in orders:
        raise DataError(f"stream {spec!r}: order must be one of {', '.join(map(str, orders))}, got {raw!r}")
    return orders[int(raw)]


def plan(spec: str) -> tuple[str, dict[str, Any], list[tuple[dict[str, Any], Path, str]]]:
    """What a ``cl-benchmark:`` or ``trace:`` spec names (see the module docstring): the stream's
    name, its identity, and per task a file-task entry (as in a YAML stream), its folder and where
    to say an error is; :func:`streams.stream.load_stream` reads them."""
    layout, root, options = parse(spec)
    if not root.is_dir():
        raise DataError(f"stream {spec!r}: {root} is not a folder")
    if layout == "trace" and "generative" in options:
        raise DataError(f"stream {spec!r}: TRACE tasks are always generative; drop ':generative'")
    tasks = []
    if layout == "cl-benchmark":
        for name in task_names(spec, options, CL_ORDERS):
            folder = _cl_folder(root, name, spec)
            tasks.append((_cl_entry(folder, name, options.get("generative", False)), folder, f"stream {spec!r}: task {name!r}"))
    else:
        for name in task_names(spec, options, TRACE_ORDERS):
            folder = root / name
            if not (folder / "train.json").is_file():
                raise DataError(f"stream {spec!r}: no {folder / 'train.json'} (TRACE's layout: <folder>/<data set>/"
                                "{train,eval,test}.json)")
            entry = {"name": name, "train": "train.json", "text_column": "prompt", "target_column": "answer",
                     "metric": TRACE_METRICS.get(name, "exact"),
                     **{split: f"{file}.json" for split, file in (("dev", "eval"), ("test", "test"))
                        if (folder / f"{file}.json").is_file()}}
            tasks.append((entry, folder, f"stream {spec!r}: task {name!r}"))
    label = f"order{options.get('order', 1)}" if "tasks" not in options else "custom"
    return f"{layout}-{label}", {"stream": layout, "root": str(root.resolve()), **options}, tasks


def _cl_folder(root: Path, name: str, spec: str) -> Path:
    found = sorted(p for p in root.glob(f"*/{name}") if p.is_dir())
    if len(found) != 1:
        why = "not found" if not found else f"found {len(found)} times ({', '.join(map(str, found))})"
        raise DataError(f"stream {spec!r}: data set {name!r} {why} under {root} (the CL_Benchmark layout: "
                        "<folder>/<category>/<data set>/train.json)")
    return found[0]


def _cl_entry(folder: Path, name: str, generative: bool) -> dict[str, Any]:
    """The file-task entry (as in a YAML stream) of one CL_Benchmark data set folder."""
    labels_file = folder / "labels.json"
    try:
        labels = json.loads(labels_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{labels_file}: not found (each CL_Benchmark data set lists its labels there)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{labels_file}: not a readable JSON list of label names ({e})") from None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels) \
            or len(set(labels)) != len(labels):
        raise DataError(f"{labels_file}: expected a list of at least 2 distinct label names, got {labels!r}")
    files = {split: f"{split}.json" for split in ("train", "dev", "test") if (folder / f"{split}.json").is_file()}
    if not generative:
        return {"name": name, "text_column": "sentence", "label_column": "label", "label_names": labels, **files}
    instruction = INSTRUCTIONS.get(folder.parent.name, "Answer with one of the options.")
    def esc(s: str) -> str:  # a brace in a label is literal text in the template
        return s.replace("{", "{{").replace("}", "}}")

    template = f"{esc(instruction)} Options: {esc(', '.join(labels))}.\n" + "{text}" + "\nAnswer:"
    return {"name": name, "text_column": "sentence", "target_column": "label", "template": template, **files}
