"""Upload a run directory to an MLflow store afterwards: ``continual sync RUN --tracking-uri URI``.

For runs whose tracking server was down (the run went on, see
:class:`~continual.tracking.GuardedLogger`), runs made with ``--no-mlflow``, or a copy of the
results for another store. Everything comes from the run directory, verified: the parameters,
each step's training curve, scores and checkpoints, the accuracy matrix row by row, and, for a
finished run, the final metrics and files. The new MLflow run's id is written back into the run
directory, so a later ``--resume`` continues logging into it.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

from .metrics import AccuracyMatrix
from .rundir import RunLock, RunStateError, atomic_write, not_a_run, read_state, run_info, sealed, write_state
from .tracking import DEFAULT_EXPERIMENT, MLflowLogger, live_run, step_metrics

RESULT_FILES = ("results.json", "matrix.csv", "matrix_f1.csv", "heatmap.png", "stream.yaml")


def _step(logger: MLflowLogger, run: Path, record: dict[str, Any], matrix: AccuracyMatrix) -> None:
    row, names = record["row"], record["tasks"]
    index = {n: j for j, n in enumerate(matrix.tasks)}
    logger.start_step(row, names, {"row": row, "synced": True})
    for r in record.get("history", []):
        logger.log_step(r)
    result = types.SimpleNamespace(best_dev=record["best_dev"], seconds=record["train_seconds"], steps=record["steps"],
                                   best_step=record["best_step"])
    untrained = {n: float(matrix.R[index[n] - 1, index[n]]) for n in names
                 if index[n] > 0 and not math.isnan(matrix.R[index[n] - 1, index[n]])}
    test = {n: float(matrix.R[row, index[n]]) for n in names}
    artifacts = {f"checkpoint/{d.name}": d for n in names for d in sorted((run / "checkpoints" / n).glob("*"))
                 if d.is_dir()}
    logger.end_step(row, step_metrics(result, untrained, test, record["trainable_params"]), artifacts)
    logger.log_matrix(row, matrix.tasks, list(matrix.R[row]), list(matrix.F1[row]), matrix.summary(row), list(matrix.A[row]))


def logged_already(info: dict[str, Any], tracking_uri: str, experiment: str) -> str | None:
    """The MLflow run that already holds this run directory in ``tracking_uri``'s ``experiment``
    (logged live without a failure, or by an earlier sync), if it is still there; else None.
    Syncing again would add a second copy, and MLflow's views would count the run twice. Only the
    store the directory records (the last one logged to) is known: a copy in another is not."""
    tracking = info.get("tracking") or {}
    run_id = tracking.get("parent_run_id")
    if (not run_id or tracking.get("sync_needed") or tracking.get("tracking_uri") != tracking_uri
            or tracking.get("experiment") != experiment):
        return None
    return run_id if live_run(tracking_uri, run_id) else None  # a deleted one: nothing to duplicate


def sync_run(run_dir: str | Path, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
             run_name: str | None = None, again: bool = False) -> str:
    """Log the run in ``run_dir`` to ``tracking_uri`` as a new MLflow run; returns its id. A run
    directory that store already holds is not logged twice: its run id comes back unless
    ``again`` (then a copy is logged)."""
    run = Path(run_dir)
    if not run_info(run):
        raise RunStateError(not_a_run(run, "holds no results.json or state.json: not a stream run directory"))
    try:  # the run's own lock: a run still going writes its state after every task
        lock = RunLock(run).acquire()
    except RunStateError:
        holder = (run / ".lock").read_text().strip() or "another process"
        raise RunStateError(f"{run} is in use by a live run ({holder}): sync it once that has ended (now it would be "
                            "logged unfinished, and the run's next save would drop the record of this upload)") from None
    try:
        return _sync(run, run_info(run), tracking_uri, experiment, run_name, again)
    finally:
        lock.release()


def _sync(run: Path, info: dict[str, Any], tracking_uri: str, experiment: str, run_name: str | None, again: bool) -> str:
    existing = None if again else logged_already(info, tracking_uri, experiment)
    if existing:
        return existing
    finished = "metrics" in info and (run / "results.json").exists()
    matrix = AccuracyMatrix.from_dict(info["matrix"])
    identity = info["identity"]
    logger = MLflowLogger(tracking_uri, experiment, run_name or run.name)
    params = {**identity, "data": {n: f[:16] for n, f in identity["data"].items()}, "synced_from": str(run.resolve()),
              "scores": {t: s for t, s in zip(matrix.tasks, matrix.scores) if s != "score"}}  # known names only
    tracking = logger.start_stream(identity["stream"], params, None)
    for record in info["steps"]:
        _step(logger, run, record, matrix)
    if finished:
        metrics = {k: (math.nan if v is None else v) for k, v in info["metrics"].items()}
        logger.end_stream(metrics, [run / f for f in RESULT_FILES if (run / f).exists()], "FINISHED")
    else:
        logger.end_stream({}, [], "KILLED")  # an unfinished run: what is done so far
    _remember(run, tracking, finished)
    return tracking["parent_run_id"]


def _remember(run: Path, tracking: dict[str, Any], finished: bool) -> None:
    """Write the new MLflow run into the run directory (results.json and state.json, re-sealed)."""
    if (run / "state.json").exists():
        state = read_state(run / "state.json")
        state.tracking = tracking
        write_state(run, state)
    if finished:
        results = {k: v for k, v in run_info(run).items() if k != "checksum"}
        results["tracking"] = tracking
        atomic_write(run / "results.json", json.dumps(sealed(results), indent=1))
