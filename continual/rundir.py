"""A run's output directory: the source of truth of a stream run.

    <out>/state.json                  RunState: what must match to resume, steps done, the matrix so far
    <out>/state-step<k>.safetensors   everything training changed, after step k (see Strategy.state)
    <out>/results.json, matrix*.csv, heatmap*.png, stream.yaml   when finished (RUN_FILES)
    <out>/checkpoints/<task>/<name>/  each task's shareable delta checkpoint (+ backbone.safetensors
                                      for strategies that fine-tune the backbone)

Every file is written whole or not at all (a temporary file, then a rename), tensors before the
JSON that points at them, so a kill at any moment leaves the last complete state. A run holds an
exclusive lock on its directory (``<out>/.lock``, :class:`RunLock`) from before it reads the
directory until it ends: a second run there (even with ``--overwrite``) is refused.

Every file is verified when it is read back. ``state.json`` and ``results.json`` carry the SHA-256
of their own content (``checksum``) and a manifest, ``files``: the SHA-256 of every file the run
wrote and reads again (the state tensors, each checkpoint's files, a fine-tuned backbone). The
manifest is written atomically, after the files it lists. A mismatch is a :class:`RunStateError`
naming the file: a damaged run is refused, never loaded into a silently different matrix."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters import DeltaModel, save_task
from adapters.checkpoint import sha256_file
from adapters.fingerprint import json_digest
from streams import Task, TaskStream

from .metrics import AccuracyMatrix, score_label
from .plots import heatmap

STATE_VERSION = 2  # 2: checksum and files manifest
BACKBONE_FILE = "backbone.safetensors"


class RunStateError(RuntimeError):
    """The output directory holds a run that does not match, or its state is damaged."""


@dataclasses.dataclass
class RunState:
    """What ``state.json`` holds (the JSON keys are the field names):
    identity  what must be equal for the run to be resumed (stream, data, strategy, settings, backbone)
    done      indices of the finished steps of the strategy's plan
    steps     one record per finished step (times, best dev scores, trainable parameters)
    matrix    the accuracy / macro-F1 matrices so far
    tracking  what the loggers need to continue their runs (MLflow parent run id, store)
    tensors   the tensor file of the last finished step (None before the first)
    seconds   wall time spent so far, over every process that worked on the run
    files     the manifest: path relative to the run directory -> SHA-256"""

    identity: dict[str, Any]
    matrix: AccuracyMatrix
    done: list[int] = dataclasses.field(default_factory=list)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tracking: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensors: str | None = None
    seconds: float = 0.0
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return sealed({"version": self.version, "identity": self.identity, "done": self.done, "steps": self.steps,
                       "matrix": self.matrix.to_dict(), "tracking": self.tracking, "tensors": self.tensors,
                       "seconds": self.seconds, "files": self.files})

    @classmethod
    def from_json(cls, data: Any, source: Path) -> "RunState":
        """Validate the JSON read from ``source``; a clear :class:`RunStateError` when it is not a state."""
        damaged = f"{source} is not a valid run state"
        if not isinstance(data, dict):
            raise RunStateError(f"{damaged} (it holds a {type(data).__name__}, not an object); start again with --overwrite")
        if data.get("version") != STATE_VERSION:
            raise RunStateError(f"{source} has state version {data.get('version')}; this version reads {STATE_VERSION} "
                                "(start again with --overwrite)")
        check_sealed(data, source)
        kinds = {"identity": dict, "done": list, "steps": list, "matrix": dict, "tracking": dict, "seconds": (int, float),
                 "files": dict}
        bad = [k for k, t in kinds.items() if not isinstance(data.get(k), t)]
        if bad or not (data.get("tensors") is None or isinstance(data["tensors"], str)):
            raise RunStateError(f"{damaged} (missing or malformed: {', '.join(bad) or 'tensors'}); start again with --overwrite")
        try:
            matrix = AccuracyMatrix.from_dict(data["matrix"])
        except (KeyError, TypeError, ValueError) as e:
            raise RunStateError(f"{damaged} (its matrix: {e}); start again with --overwrite") from None
        return cls(data["identity"], matrix, list(data["done"]), list(data["steps"]), dict(data["tracking"]),
                   data["tensors"], float(data["seconds"]), dict(data["files"]))


def sealed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the SHA-256 of its own content under ``checksum``."""
    return {**data, "checksum": json_digest(data)}


def check_sealed(data: dict[str, Any], source: Path) -> None:
    if data.get("checksum") != json_digest(data):
        raise RunStateError(f"{source} does not match its checksum: the file was damaged or edited; "
                            "start again with --overwrite (or restore it from a copy)")


def record(out: Path, files: dict[str, str], paths: Any) -> None:
    """Add the SHA-256 of each of ``paths`` (inside ``out``) to the manifest ``files``."""
    for p in paths:
        p = Path(p)
        files[str(p.relative_to(out))] = sha256_file(p)


def verify(out: Path, files: dict[str, str], path: Path) -> Path:
    """``path`` (inside ``out``) if it matches the manifest; a :class:`RunStateError` naming it if
    it is missing or differs. Files the manifest does not list (older runs) pass."""
    key = str(Path(path).relative_to(out))
    if key not in files:
        return path
    if not Path(path).is_file():
        raise RunStateError(f"{path} is missing (the run's manifest lists it)")
    if sha256_file(path) != files[key]:
        raise RunStateError(f"{path} does not match the checksum in {out}'s manifest: the file was damaged "
                            "or replaced; start again with --overwrite (or restore it from a copy)")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all."""
    _whole(path, lambda tmp: tmp.write_text(text))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    _whole(path, lambda tmp: save_file({n: v.detach().contiguous().cpu() for n, v in tensors.items()}, str(tmp)))


def _whole(path: Path, write: Any) -> None:
    """``write(tmp)``, then rename tmp to ``path``; a failed write (a full disk) leaves ``path`` as
    it was and is one :class:`RunStateError` saying the last complete state is kept."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RunStateError(f"cannot write {path} ({reason}); the run's last complete state is kept: free space (or "
                            "fix the directory) and continue with --resume") from None


def write_state(out: Path, state: RunState, tensors: dict[str, torch.Tensor] | None = None, step: int | None = None) -> None:
    """Tensors first (a new file per step), then the JSON that points at them; the previous
    step's tensor file is removed only once nothing points at it."""
    old = state.tensors
    if tensors is not None:
        name = f"state-step{step}.safetensors"
        save_tensors(tensors, out / name)
        state.tensors = name
        record(out, state.files, [out / name])
    if old and old != state.tensors:
        state.files.pop(old, None)
    atomic_write(out / "state.json", json.dumps(state.to_json(), indent=1))
    if old and old != state.tensors:
        (out / old).unlink(missing_ok=True)


def read_state(path: Path) -> RunState:
    """The state in ``path`` (``<out>/state.json``), checked; :class:`RunStateError` when damaged."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStateError(f"{path} is damaged ({e}); start again with --overwrite") from None
    state = RunState.from_json(data, path)
    if state.tensors and not (path.parent / state.tensors).exists():
        raise RunStateError(f"{path} refers to {state.tensors}, which is missing; start again with --overwrite")
    check_present(path.parent, state.files)  # a resumed run would finish without them, exit 0
    return state


def check_present(run: Path, files: Iterable[str]) -> None:
    """Refuse a run directory that lacks a file its manifest lists (``files``, relative paths)."""
    lost = sorted(f for f in files if not (run / f).exists())
    if lost:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        raise RunStateError(f"{run} is missing files its manifest lists ({', '.join(lost[:3])}{more}): the run "
                            "directory was damaged; restore them from a copy, or start again with --overwrite")


def read_tensors(out: Path, state: RunState, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of the last finished step, on ``device``, verified against the manifest."""
    path = verify(out, state.files, out / state.tensors)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunStateError(f"{path} cannot be read ({e}); start again with --overwrite") from None


#: what a run writes beside state.json (and its tensors), its checkpoints folder last
RUN_FILES = ("results.json", "matrix.csv", "matrix_f1.csv", "matrix_agnostic.csv", "heatmap.png", "heatmap_agnostic.png",
             "stream.yaml", "checkpoints")


def clear_run(out: Path) -> None:
    """Remove a saved run (``--overwrite``), checkpoints too (``route`` would load an old one's)."""
    for old in [out / "state.json", *out.glob("state-step*.safetensors"), *(out / n for n in RUN_FILES[:-1])]:
        old.unlink(missing_ok=True)
    shutil.rmtree(out / RUN_FILES[-1], ignore_errors=True)


def check_out(out: Path, what: str = "the run", option: str = "--out") -> None:
    """Refuse, before anything is loaded, an output directory that cannot be made or written: a file,
    a path under a file, no write permission, a read-only mount (``what`` goes there, by ``option``)."""
    for parent in (out, *out.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise RunStateError(f"cannot write {what} to {out}: {parent} is a file, not a directory; give another {option}")
        if not os.access(parent, os.W_OK | os.X_OK):  # also false on a read-only mount (EROFS), even for root
            raise RunStateError(f"cannot write {what} to {out}: {parent} is not writable (permissions or a read-only "
                                f"file system); give another {option}")
        return


class RunLock:
    """An exclusive ``flock`` on ``<out>/.lock`` for the life of a run, released when the process
    ends however it ends. Where ``fcntl`` is missing (Windows) nothing is locked."""

    def __init__(self, out: Path) -> None:
        self.out, self.file = out, None

    def acquire(self) -> "RunLock":
        check_out(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:
            return self
        f = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunStateError(f"{self.out} is in use by another run ({holder}); wait for it to end, or give "
                                "another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the lock
            self.file = None


def export_checkpoints(model: DeltaModel, strategy: Any, tasks: Sequence[Task], out: Path,
                       files: dict[str, str]) -> dict[str, Path]:
    """Shareable checkpoints of what each task runs with (its delta + head, or a shared delta).

    A strategy that trains the backbone also writes the backbone as it is now to
    ``checkpoints/backbone.safetensors`` (the tasks' heads need it; not logged to MLflow: it is
    the size of the model). Each file written goes into the manifest ``files``."""
    root, artifacts, written = out / "checkpoints", {}, []
    for t in tasks:
        for name in strategy.exported(t.name):
            directory = save_task(model, name, root / t.name / name)
            artifacts[f"checkpoint/{name}"] = directory
            written += sorted(p for p in directory.iterdir() if p.is_file())
    if strategy.trains_backbone:
        root.mkdir(parents=True, exist_ok=True)
        save_tensors(model.backbone.state_dict(), root / BACKBONE_FILE)
        written.append(root / BACKBONE_FILE)
    record(out, files, written)
    return artifacts


def write_stream_spec(out: Path, stream: TaskStream, fingerprints: dict[str, str]) -> None:
    import yaml

    spec = {"name": stream.name, **stream.spec,
            "tasks_resolved": [{"name": t.name, "labels": t.label_names, "sizes": t.sizes(), "source": t.source,
                                "fingerprint": fingerprints[t.name]} for t in stream]}
    atomic_write(out / "stream.yaml", yaml.safe_dump(json.loads(json.dumps(spec, default=str)), sort_keys=False))


def _csv_cell(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6f}"


def write_results(out: Path, stream: TaskStream, state: RunState, metrics: dict[str, float]) -> list[Path]:
    """results.json, the matrices as CSV and the heatmap; returns the files (to log)."""
    matrix = state.matrix
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    results = {"stream": stream.name, "metrics": clean, "matrix": matrix.to_dict(), "steps": state.steps,
               "seconds": state.seconds, "identity": state.identity, "tracking": state.tracking, "files": state.files}
    atomic_write(out / "results.json", json.dumps(sealed(results), indent=1))
    for name, M, b in (("matrix.csv", matrix.R, matrix.b), ("matrix_f1.csv", matrix.F1, matrix.b_f1),
                       ("matrix_agnostic.csv", matrix.A, None)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["after"] + matrix.tasks)
            if name == "matrix.csv":  # what each column's entries are
                w.writerow(["score"] + matrix.scores)
            if b is not None:
                w.writerow(["untrained"] + [_csv_cell(v) for v in b])
            for n, r in zip(matrix.tasks, M):
                w.writerow([n] + [_csv_cell(v) for v in r])
    heatmap(matrix, out / "heatmap.png", f"{stream.name}: {score_label(matrix)} R[i, j]")
    heatmap(matrix, out / "heatmap_agnostic.png", f"{stream.name}: {score_label(matrix)} without the task id", agnostic=True)
    return [out / n for n in RUN_FILES[:-1]]


def not_a_run(run: Path, why: str) -> str:
    """The message for a folder that is not a stream run: ``why``, and where the runs are when it
    is a ``continual compare`` study's folder (its runs are its sub-folders)."""
    if (run / "report.json").is_file():
        entries = sorted(p.name for p in run.iterdir() if p.is_dir() and any(p.glob("**/results.json")))
        return (f"{run} is a compare study's folder, not one run: its report is {run / 'report.md'}, its runs are "
                f"its sub-folders ({', '.join(str(run / e) for e in entries[:4])}{', ...' if len(entries) > 4 else ''})")
    return f"{run} {why}"


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory says about itself: results.json when finished, else state.json;
    verified (a damaged file is a :class:`RunStateError`), ``{}`` when it holds neither."""
    run = Path(run_dir)
    for name in ("results.json", "state.json"):
        path = run / name
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RunStateError(f"{path} is damaged ({e})") from None
            if not isinstance(data, dict):
                raise RunStateError(f"{path} is damaged (it holds a {type(data).__name__}, not an object)")
            if "checksum" in data or name == "state.json":  # results.json of runs before checksums: none
                check_sealed(data, path)
            return data
    return {}
