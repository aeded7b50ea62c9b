"""Reading a user's labelled text from CSV / JSONL / parquet files or a HF hub data set.

Every problem is reported with the file, the row (1-based, header excluded) and the column, and
before anything is trained: a stream either loads whole or not at all.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from .catalog import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# Longest text cell read. A training example keeps at most a few hundred tokens, but one huge cell
# costs gigabytes while the table is copied and tokenised (one 200 MB cell took 13 GB).
MAX_CELL = 1_000_000


def read_table(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """A data file as a DataFrame of strings/numbers; clear errors for missing, empty, malformed
    or wrongly encoded files."""
    try:
        path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # a symlink loop (ELOOP), a permission error, a name too long
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    if not path.is_file():  # a named pipe with no writer blocked the run before its first task, for good
        raise DataError(f"{path}: not a regular file (a pipe, socket or device), expected a data file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if kind == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: cannot decode byte {e.start} (line {line}) as {encoding}; re-save the file "
                        f"as UTF-8 or set 'encoding:' for this task (e.g. latin-1)") from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if kind == "jsonl":
        return _read_jsonl(path, text)
    import csv
    import io

    sep = "\t" if kind == "tsv" else ","
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sep))
        frame = pd.read_csv(io.StringIO(text), sep=sep, keep_default_na=False, na_values=[""], dtype=object)
    except (pd.errors.ParserError, csv.Error) as e:
        raise DataError(f"{path}: malformed {kind.upper()} ({e})") from None
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # pandas would rename the second one "text.1" and the task would read the first
        raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once; rename them")
    return frame


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of objects is accepted too
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n} is a {type(row).__name__}, expected an object with named fields")
    return pd.DataFrame(rows, dtype=object)


# Spellings of "no value" that spreadsheets, pandas and JSON exporters write. The CSV reader keeps
# them as text (so a text column may say "NA"), but as a *label* they mean a missing value, never a
# class: a row labelled "NaN" is an error naming its row and column, not a new class.
MISSING_MARKERS = {"nan", "na", "n/a", "#n/a", "null", "none", "nil", "<na>", "-nan"}


def _cell(v: Any, where: str, n: int, col: str) -> None:
    """Refuse a value no task can use: a nested one (a parquet list or struct) or a huge one."""
    if isinstance(v, (list, tuple, dict, set, np.ndarray)):
        raise DataError(f"{where}: row {n}, column {col!r}: a nested value ({type(v).__name__}), expected text or a label")
    if isinstance(v, str) and len(v) > MAX_CELL:
        raise DataError(f"{where}: row {n}, column {col!r}: {len(v):,} characters, more than the {MAX_CELL:,} a cell "
                        "may hold (a training example keeps a few hundred tokens); shorten it")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def _is_missing_label(v: Any) -> bool:
    return _is_missing(v) or (isinstance(v, str) and v.strip().lower() in MISSING_MARKERS)


def extract(
    frame: pd.DataFrame, where: str, text_column: str, label_column: str, text_pair_column: str | None,
) -> tuple[dict[str, list[str]], list[Any]]:
    """Text columns and raw labels of a table; ``where`` names the file in errors."""
    wanted = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (columns: {have}); set "
                        f"text_column / label_column / text_pair_column for this task")
    if len(frame) == 0:
        raise DataError(f"{where}: no rows (empty task)")
    columns = {"text": text_column, **({"text_pair": text_pair_column} if text_pair_column else {})}
    out: dict[str, list[str]] = {}
    for key, col in columns.items():
        values = frame[col].tolist()
        for n, v in enumerate(values, 1):
            _cell(v, where, n, col)
            if _is_missing(v):
                raise DataError(f"{where}: row {n}, column {col!r}: empty text")
        out[key] = [str(v) for v in values]
    labels = frame[label_column].tolist()
    for n, v in enumerate(labels, 1):
        _cell(v, where, n, label_column)
        if _is_missing_label(v):
            shown = "" if _is_missing(v) else f" ({v!r} marks a missing value)"
            raise DataError(f"{where}: row {n}, column {label_column!r}: missing label{shown}")
    _one_kind(labels, where, label_column)
    return out, labels


def _one_kind(labels: list[Any], where: str, column: str) -> None:
    """A typed file (JSON lines, parquet) whose labels mix numbers, words and booleans (1 and
    "yes"; true and "true") is refused: each spelling became a class of its own, so one class was
    learned as two."""
    first: dict[str, int] = {}
    for n, v in enumerate(labels, 1):
        first.setdefault(_label_kind(v), n)
    kinds = [k for k in ("numbers", "words", "booleans") if k in first][:2]
    if len(kinds) == 2:
        (a, i), (b, j) = ((k, first[k]) for k in kinds)
        raise DataError(f"{where}: column {column!r} mixes {a} (row {i}: {labels[i - 1]!r}) and {b} "
                        f"(row {j}: {labels[j - 1]!r}); each spelling would be a class of its own: write every "
                        "label the same way")


def _label_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):  # (before numbers: a bool is an int in Python)
        return "booleans"
    if isinstance(v, (int, float, np.number)) or _norm(v).lstrip("-").isdigit():  # "0" reads as 0
        return "numbers"
    return "words"


def extract_targets(frame: pd.DataFrame, where: str, text_column: str, target_column: str) -> tuple[list[str], list[str]]:
    """Prompt texts and target texts of a generative task's table; ``where`` names the file."""
    missing = [c for c in (text_column, target_column) if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (columns: {have}); set "
                        "text_column / target_column for this task")
    if len(frame) == 0:
        raise DataError(f"{where}: no rows (empty task)")
    out = []
    for col in (text_column, target_column):
        values = frame[col].tolist()
        for n, v in enumerate(values, 1):
            _cell(v, where, n, col)
            if _is_missing(v) or not str(v).strip():
                raise DataError(f"{where}: row {n}, column {col!r}: empty text")
        out.append([str(v) for v in values])
    return out[0], out[1]


def _norm(v: Any) -> str:
    """Label values as strings, with 1.0 and '1' alike read as '1'."""
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        return str(int(v))
    s = str(v).strip()
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else s
    except ValueError:
        return s


def label_vocabulary(train_labels: Sequence[Any], label_names: Sequence[str] | None) -> list[str]:
    """The label names: given, or the training labels sorted (numerically when all are integers)."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names has duplicates: {names}")
        return names
    values = sorted({_norm(v) for v in train_labels})
    if all(v.lstrip("-").isdigit() for v in values):
        values.sort(key=int)
    return values


def encode_labels(labels: Sequence[Any], names: list[str], where: str, column: str, given: bool) -> list[int]:
    """Label ids; a label outside ``names`` is an error naming the file, row and column.

    Integer labels index ``label_names`` when those were given and the integers fit."""
    index = {n: i for i, n in enumerate(names)}
    normed = [_norm(v) for v in labels]
    if given and all(v.isdigit() for v in normed) and not any(v in index for v in normed):
        past = next((n for n, v in enumerate(normed, 1) if int(v) >= len(names)), None)
        if past is None:
            return [int(v) for v in normed]
        # 1-based class numbers (AG News' 1-4) against names indexed from 0
        raise DataError(f"{where}: row {past}, column {column!r}: label {normed[past - 1]} is past label_names' last "
                        f"position ({len(names) - 1}; known labels: {', '.join(names)}): integer labels index label_names "
                        "from 0, so give them from 0 (1-based ones minus 1), or as many names as there are labels")
    out = []
    for n, v in enumerate(normed, 1):
        if v not in index:
            origin = "in label_names" if given else "in the training data"
            # YAML 1.1 reads unquoted yes/no/on/off in label_names as true/false
            yaml_bool = given and v.lower() in ("yes", "no", "on", "off") and bool({"True", "False"} & set(names))
            hint = ("; YAML reads yes, no, on and off unquoted as true / false: quote the names in label_names, "
                    "e.g. ['yes', 'no']") if yaml_bool else ""
            raise DataError(f"{where}: row {n}, column {column!r}: label {v!r} never occurs {origin} "
                            f"(known labels: {', '.join(names)}){hint}")
        out.append(index[v])
    return out


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the HuggingFace hub cannot be reached (its host does not resolve or refuses a connection),
    or None when it can or this cannot tell (a proxy, or ``HF_HUB_OFFLINE`` already set). The same
    probe as ``adapters.backbones.hub_unreachable``: the two bottom layers share no module."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def load_hub(name: str, config: str | None, task: str) -> dict[str, pd.DataFrame]:
    """Splits of a HF hub data set as DataFrames; offline, a clear error naming the way out."""
    import datasets
    import huggingface_hub.constants as hub

    down = hub_unreachable()
    # unreachable, the hub client retries for ~30 s before failing; in offline mode the datasets
    # cache still serves a set loaded before, and anything else fails at once (both read the flag
    # from these module constants at call time, so it is set there for this call only)
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    try:
        if down:
            datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
        dd = datasets.load_dataset(name, config)
    except Exception as e:  # offline gives ConnectionError / OfflineModeIsEnabled / FileNotFoundError
        raise DataError(
            f"task {task!r}: cannot load the hub data set {name!r}{f' ({config})' if config else ''}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Hub data needs network access"
            f"{f' (the hub cannot be reached: {down})' if down else ''}; "
            f"offline, export the data to a local CSV/JSONL/parquet file and give its path as 'train:'."
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
    return {split: dd[split].to_pandas() for split in dd}
