"""The scheduler: run a task stream, fill the accuracy matrix, save after every step, resume.

For each training step of the strategy's plan (one task per step for sequential strategies):

1. add the step's task(s) with untrained parameters (seeded) and score task j on the model as it
   stands: that is R[j-1, j], the entry forward transfer needs;
2. train (early stopping on dev), then freeze what the strategy freezes;
3. score every task seen so far on its test split: row ``row`` of R (and of the macro-F1 matrix);
4. write the resumable state (``state.json`` + one tensor file) and log everything.

Before the first step each task is scored once on the untrained model (b, for FWT).

Seeds: task j's parameters are initialised after ``torch.manual_seed(task_seed(seed, j))`` and its
training runs with that seed too, so a resumed stream retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from datasets import DatasetDict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adapters import DeltaModel, backbone_fingerprint, save_task
from streams import Task, TaskStream

from .metrics import AccuracyMatrix, summarize
from .plots import format_matrix, heatmap
from .strategies import Strategy
from .tracking import StreamLogger
from .train import TrainConfig, eval_loader, evaluate, resolve_device, tokenize

STATE_VERSION = 1


class RunStateError(RuntimeError):
    """The output directory holds a run that does not match, or its state is damaged."""


def task_seed(seed: int, index: int) -> int:
    return seed * 100_003 + 1_000 * (index + 1)


@dataclasses.dataclass
class StreamResult:
    """What a finished stream gives back. ``steps``: one record per training step."""

    matrix: AccuracyMatrix
    metrics: dict[str, float]
    steps: list[dict[str, Any]]
    out_dir: Path
    tracking: dict[str, Any]
    seconds: float

    def table(self, f1: bool = False) -> str:
        return format_matrix(self.matrix, self.metrics, f1)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _identity(stream: TaskStream, model: DeltaModel, strategy: Strategy, config: TrainConfig, seed: int) -> dict[str, Any]:
    """What must be equal for a saved run to be resumed."""
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "device", "seed")}
    return {"stream": stream.name, "tasks": stream.names, "data": stream.fingerprints(), "strategy": strategy.describe(),
            "train": train, "seed": seed, "backbone": backbone_fingerprint(model.backbone)["weights_sha256"]}


class _Tokenised:
    """Each task's splits tokenised once per run (the test sets are scored many times)."""

    def __init__(self, tokenizer: Any, default_length: int, eval_batch: int) -> None:
        self.tokenizer, self.default_length, self.eval_batch = tokenizer, default_length, eval_batch
        self._data: dict[str, DatasetDict] = {}
        self._loaders: dict[tuple[str, str], Any] = {}

    def length(self, task: Task) -> int:
        return task.max_length or self.default_length

    def __call__(self, task: Task) -> DatasetDict:
        if task.name not in self._data:
            self._data[task.name] = DatasetDict({s: tokenize(ds, self.tokenizer, self.length(task))
                                                 for s, ds in task.splits().items()})
        return self._data[task.name]

    def loader(self, task: Task, split: str = "test") -> Any:
        key = (task.name, split)
        if key not in self._loaders:
            self._loaders[key] = eval_loader(self(task)[split], self.tokenizer, self.length(task), self.eval_batch)
        return self._loaders[key]


def run_stream(
    stream: TaskStream,
    model: DeltaModel,
    strategy: Strategy,
    config: TrainConfig = TrainConfig(),
    out_dir: str | Path = "runs/stream",
    *,
    seed: int = 0,
    loggers: Sequence[StreamLogger] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra_params: dict[str, Any] | None = None,
) -> StreamResult:
    """Run ``stream`` with ``strategy`` on ``model``; everything lands in ``out_dir``.

    ``resume=True`` continues a run whose state is in ``out_dir`` after its last finished step
    (nothing finished is retrained). Without it an existing run there is an error unless
    ``overwrite=True``."""
    if model.tokenizer is None:
        raise ValueError("run_stream needs a model with a tokenizer")
    out = Path(out_dir)
    state_path = out / "state.json"
    identity = _identity(stream, model, strategy, config, seed)
    state = None
    if state_path.exists() and overwrite and not resume:
        for old in [state_path, *out.glob("state-step*.safetensors"), out / "results.json"]:
            old.unlink(missing_ok=True)
    elif state_path.exists():
        state = _read_state(state_path)
        if not resume:
            raise RunStateError(f"{out} already holds a run ({len(state['done'])}/{len(strategy.plan(len(stream)))} steps "
                                "done): resume it (--resume) or start again (--overwrite)")
    if state is not None and state["identity"] != identity:
        diff = sorted(k for k in identity if identity[k] != state["identity"].get(k))
        raise RunStateError(f"{out} holds a different run (differs in: {', '.join(diff)}); use another output "
                            "directory, or --overwrite to replace it")
    if model.tasks:
        raise ValueError(f"run_stream needs a model without tasks; it has {list(model.tasks)}")

    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    model.to(device)
    tasks, T = stream.tasks, len(stream)
    plan = strategy.plan(T)
    data = _Tokenised(model.tokenizer, config.max_length, config.batch_size * 2)
    start = time.perf_counter()

    def score(task: Task) -> dict[str, float]:
        return evaluate(model, task.name, data.loader(task), strategy.active(task.name), config.precision)

    if state is None:
        matrix = AccuracyMatrix(stream.names)
        for j, task in enumerate(tqdm(tasks, desc="untrained baseline (b)", disable=not progress, leave=False)):
            torch.manual_seed(task_seed(seed, j))
            strategy.prepare(model, task)
            s = score(task)
            matrix.update(None, j, s["accuracy"], s["macro_f1"])
        for name in reversed(list(model.tasks)):  # a task using another (a fusion) goes first
            model.remove_task(name)
        state = {"version": STATE_VERSION, "identity": identity, "done": [], "steps": [], "matrix": matrix.to_dict(),
                 "tracking": {}, "tensors": None, "seconds": 0.0}
        _write_state(out, state, None)
    else:
        matrix = AccuracyMatrix.from_dict(state["matrix"])
        for k in state["done"]:  # rebuild the structure, then load the trained values
            for j in plan[k]:
                torch.manual_seed(task_seed(seed, j))
                strategy.prepare(model, tasks[j])
                strategy.finish(model, tasks[j])
        if state["tensors"]:
            strategy.load_state(model, load_file(str(out / state["tensors"]), device=str(device)))
        model.to(device)

    params = {**identity, "data": {n: f[:16] for n, f in identity["data"].items()}, "device": str(device),
              "backbone_name": model.backbone_name, **(extra_params or {})}
    for lg in loggers:
        state["tracking"] = lg.start_stream(stream.name, params, state["tracking"] or None) or state["tracking"]
    _write_state(out, state, None)
    _write_stream_spec(out, stream, identity["data"])

    try:
        bar = tqdm(total=len(plan), initial=len(state["done"]), desc=f"stream {stream.name}", disable=not progress)
        for k, step in enumerate(plan):
            if k in state["done"]:
                continue
            row = step[-1]
            step_tasks = [tasks[j] for j in step]
            prev_row = plan[k - 1][-1] if k else None
            step_params = _step_params(step_tasks, seed, row, identity["data"])
            for lg in loggers:
                lg.start_step(row, [t.name for t in step_tasks], step_params)
            pre: dict[str, float] = {}
            for j in step:
                torch.manual_seed(task_seed(seed, j))
                strategy.prepare(model, tasks[j])
                if prev_row is not None and prev_row == j - 1:  # R[j-1, j]: before task j is trained
                    s = score(tasks[j])
                    matrix.update(j - 1, j, s["accuracy"], s["macro_f1"])
                    pre[f"untrained_test_accuracy/{tasks[j].name}"] = s["accuracy"]
            step_config = dataclasses.replace(config, seed=task_seed(seed, row), progress=progress,
                                              max_length=data.length(step_tasks[-1]))
            callback = _fan_out(loggers)
            result = strategy.train(model, step_tasks, step_config, data, callback)
            for t in step_tasks:
                strategy.finish(model, t)
            metrics: dict[str, float] = {"best_dev_accuracy": result.best_dev["accuracy"], "train_seconds": result.seconds,
                                         "steps": result.steps, "best_step": result.best_step, **pre}
            for j in range(row + 1):
                s = score(tasks[j])
                matrix.update(row, j, s["accuracy"], s["macro_f1"])
            trainable = {tasks[j].name: strategy.trainable_parameters(model, tasks[j]) for j in step}
            for j in step:
                metrics[f"test_accuracy/{tasks[j].name}"] = float(matrix.R[row, j])
                metrics[f"trainable_params/{tasks[j].name}"] = trainable[tasks[j].name]
            exported = tasks[:row + 1] if strategy.updates_old_tasks else step_tasks
            artifacts = _export_checkpoints(model, strategy, exported, out / "checkpoints")
            for t in step_tasks:
                artifacts.update(strategy.reports(model, t, data.loader(t), out / "reports" / t.name))
            so_far = _so_far(matrix, row)
            record = {"row": row, "tasks": [t.name for t in step_tasks], "train_seconds": result.seconds,
                      "steps": result.steps, "best_step": result.best_step, "best_dev": result.best_dev,
                      "trainable_params": trainable}
            for lg in loggers:
                lg.end_step(row, metrics, artifacts)
                lg.log_matrix(row, stream.names, list(matrix.R[row]), list(matrix.F1[row]), so_far)
            state["done"].append(k)
            state["steps"].append(record)
            state["matrix"] = matrix.to_dict()
            state["seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            _write_state(out, state, strategy.state(model), k)
            bar.update(1)
            bar.set_postfix(ACC=f"{so_far['ACC']:.3f}")
            tqdm.write(f"after {'+'.join(record['tasks'])}: " + "  ".join(
                f"{n}={matrix.R[row, j]:.3f}" for j, n in enumerate(stream.names[:row + 1])))
        bar.close()
        metrics = matrix.result()
        artifacts = _write_results(out, stream, matrix, metrics, state)
        for lg in loggers:
            lg.end_stream(metrics, artifacts, "FINISHED")
        return StreamResult(matrix, metrics, state["steps"], out, state["tracking"], state["seconds"])
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for lg in loggers:
            try:
                lg.end_stream({}, [], status)
            except Exception:  # the original error matters more than a logging failure
                pass
        raise


def load_run_tasks(model: DeltaModel, run_dir: str | Path, tasks: Sequence[str] | None = None) -> list[str]:
    """Load the task checkpoints a finished (or partly finished) stream saved into ``model``.

    ``tasks``: the stream tasks to load (default: every task that has checkpoints), in stream
    order; each task's checkpoints (its delta, and e.g. its fusion) load in the order saved.
    Returns the names of the model tasks added."""
    from adapters import load_task, read_meta

    run = Path(run_dir)
    root = run / "checkpoints"
    if not root.is_dir():
        raise RunStateError(f"{run} has no checkpoints/ folder: is it a stream's output directory?")
    order = []
    results, state = run / "results.json", run / "state.json"
    for f in (results, state):
        if f.exists():
            info = json.loads(f.read_text())
            order = info["matrix"]["tasks"]
            break
    saved = [t for t in order if (root / t).is_dir()] or sorted(p.name for p in root.iterdir() if p.is_dir())
    wanted = list(tasks) if tasks is not None else saved
    missing = [t for t in wanted if t not in saved]
    if missing:
        raise RunStateError(f"{run} has no checkpoints for {missing}; it has: {saved}")
    added = []
    for t in wanted:
        dirs = [p for p in sorted((root / t).iterdir()) if (p / "delta.json").exists()]
        # a task's own delta before anything built over other tasks (a fusion names its sources)
        dirs.sort(key=lambda p: any(m.get("sources") for m in read_meta(p)["methods"]))
        for d in dirs:
            added.append(load_task(model, d))
    return added


def load_run_model(run_dir: str | Path, backbone: str = "minilm", tasks: Sequence[str] | None = None) -> tuple[DeltaModel, list[str]]:
    """The backbone a run was trained on (as the run left it, if it fine-tuned it), with the
    run's task checkpoints loaded (see :func:`load_run_tasks`). Seeds torch with the run's seed
    first, as ``continual run`` does, so weights the backbone's files lack (an unused pooler)
    match the run's."""
    run = Path(run_dir)
    seed = 0
    for f in (run / "results.json", run / "state.json"):
        if f.exists():
            seed = json.loads(f.read_text())["identity"]["seed"]
            break
    torch.manual_seed(seed)
    model = DeltaModel.from_pretrained(backbone)
    trained = run / "checkpoints" / BACKBONE_FILE
    if trained.exists():  # a strategy that fine-tuned the backbone (seq-ft, avalanche-*)
        model.backbone.load_state_dict(load_file(str(trained)), strict=True)
    return model, load_run_tasks(model, run, tasks)


def _fan_out(loggers: Sequence[StreamLogger]) -> Callable[[dict[str, Any]], None] | None:
    if not loggers:
        return None

    def callback(record: dict[str, Any]) -> None:
        for lg in loggers:
            lg.log_step(record)
    return callback


def _step_params(tasks: list[Task], seed: int, row: int, fingerprints: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row, "seed": task_seed(seed, row)}
    for t in tasks:
        out[t.name] = {"labels": ",".join(t.label_names), **t.sizes(), "fingerprint": fingerprints[t.name][:16],
                       "source": t.source}
    return out


def _so_far(matrix: AccuracyMatrix, row: int) -> dict[str, float]:
    """The metrics of the stream as if it ended after ``row``."""
    return summarize(matrix.R[:row + 1, :row + 1], matrix.b[:row + 1])


BACKBONE_FILE = "backbone.safetensors"


def _export_checkpoints(model: DeltaModel, strategy: Strategy, tasks: list[Task], root: Path) -> dict[str, Path]:
    """Shareable checkpoints of what each task runs with (its delta + head, or a shared delta).

    A strategy that trains the backbone also writes the backbone as it is now to
    ``checkpoints/backbone.safetensors`` (the tasks' heads need it; not logged to MLflow: it is
    the size of the model)."""
    out = {}
    for t in tasks:
        for name in strategy.exported(t.name):
            path = save_task(model, name, root / t.name / name)
            out[f"checkpoint/{name}"] = path
    if strategy.trains_backbone:
        root.mkdir(parents=True, exist_ok=True)
        _save_tensors(model.backbone.state_dict(), root / BACKBONE_FILE)
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: v.detach().contiguous().cpu() for n, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_state(out: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None, k: int | None = None) -> None:
    """Tensors first (a new file per step), then the JSON that points at them: a kill at any
    moment leaves the last complete state in place."""
    old = state.get("tensors")
    if tensors is not None:
        name = f"state-step{k}.safetensors"
        _save_tensors(tensors, out / name)
        state["tensors"] = name
    _atomic_write(out / "state.json", json.dumps(state, indent=1))
    if old and old != state["tensors"]:
        (out / old).unlink(missing_ok=True)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunStateError(f"{path} is damaged ({e}); start again with --overwrite") from None
    if state.get("version") != STATE_VERSION:
        raise RunStateError(f"{path} has state version {state.get('version')}; this version reads {STATE_VERSION}")
    if state.get("tensors") and not (path.parent / state["tensors"]).exists():
        raise RunStateError(f"{path} refers to {state['tensors']}, which is missing; start again with --overwrite")
    return state


def _write_stream_spec(out: Path, stream: TaskStream, fingerprints: dict[str, str]) -> None:
    import yaml

    spec = {"name": stream.name, **stream.spec,
            "tasks_resolved": [{"name": t.name, "labels": t.label_names, "sizes": t.sizes(), "source": t.source,
                                "fingerprint": fingerprints[t.name]} for t in stream]}
    _atomic_write(out / "stream.yaml", yaml.safe_dump(json.loads(json.dumps(spec, default=str)), sort_keys=False))


def _write_results(out: Path, stream: TaskStream, matrix: AccuracyMatrix, metrics: dict[str, float],
                   state: dict[str, Any]) -> list[Path]:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    results = {"stream": stream.name, "metrics": clean, "matrix": matrix.to_dict(), "steps": state["steps"],
               "seconds": state["seconds"], "identity": state["identity"], "tracking": state["tracking"]}
    _atomic_write(out / "results.json", json.dumps(results, indent=1))
    for name, M, b in (("matrix.csv", matrix.R, matrix.b), ("matrix_f1.csv", matrix.F1, matrix.b_f1)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["after"] + matrix.tasks)
            w.writerow(["untrained"] + ["" if math.isnan(v) else f"{v:.6f}" for v in b])
            for n, r in zip(matrix.tasks, M):
                w.writerow([n] + ["" if math.isnan(v) else f"{v:.6f}" for v in r])
    png = heatmap(matrix, out / "heatmap.png", f"{stream.name}: accuracy R[i, j]")
    return [out / "results.json", out / "matrix.csv", out / "matrix_f1.csv", png, out / "stream.yaml"]
