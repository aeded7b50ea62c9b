"""Loggers for stream runs, behind one small interface; MLflow is the real one.

MLflow layout of a stream run: one parent run per stream (params: strategy, methods, backbone, seeds,
caps, data fingerprints; metrics: ``acc/<task>`` (a generative task's ``exact_match/``, ``token_f1/``,
``rouge_l/``, ``edit_sim/`` or ``sari/<task>``) and ``f1/<task>`` with step = row of the matrix,
``R.<i>.<j>``, the summary ACC / BWT / FWT / forgetting; artifacts: the matrix as CSV and JSON, its
heatmap PNG, the stream config) and one nested run per training step (params of the task; step
metrics ``train/loss``, ``train/lr``, ``train/samples_per_s``, ``dev/*``; the task's delta checkpoint
under ``checkpoint/``). Default store: ``sqlite:///mlflow.db`` in the working directory, no server.

This is the only module that imports mlflow; every metric name the project logs is made by
:mod:`continual.metric_names`.

The run directory is the source of truth, MLflow a copy: the scheduler writes a step's state
before it logs it, and wraps every logger in a :class:`GuardedLogger`, so a tracking server that
is down or fails costs at most a few seconds (short HTTP timeouts, then logging stops for that
run) and never a finished task. ``continual sync RUN --tracking-uri URI`` uploads a run to a
store afterwards (:func:`sync_run`). A new SQLite store is created under a file lock, so two runs
started together on it do not race in its schema migration.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .guard import GuardedLogger, best_effort, check_uri, sqlite_file, store_lock
from .logger import StreamLogger
from .metric_names import compare_metric, finite_values, fusion_metric, matrix_metrics, record_metric, step_metrics

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "GuardedLogger", "MLflowLogger", "StreamLogger", "check_experiment",
           "check_tracking_uri", "check_uri", "experiment", "fetch_results", "log_combination", "log_compare",
           "log_fusion_weights", "log_nested_run", "matrix_metrics", "record_metric", "step_metrics"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "continual"
MAX_EXPERIMENT_NAME = 500  # MLflow's (mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH), checked where names come in
COMBINATIONS_EXPERIMENT = "combinations"

# MLflow's documented limits per log_batch call: 1000 metrics and 100 params (900 leaves room for
# the params and tags a call may carry); a param value holds at most 6000 characters.
METRICS_PER_BATCH, PARAMS_PER_BATCH, PARAM_VALUE_CHARS = 900, 100, 6000


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:PARAM_VALUE_CHARS]
    return out


def check_tracking_uri(uri: str) -> str:
    """:func:`~continual.guard.check_uri`, and a URI whose scheme no MLflow tracking store serves
    (a typo such as ``sqlit:///x.db`` or ``htp://host``) refused by name before anything runs:
    otherwise the run goes on untracked and its warning points at a ``continual sync`` that fails
    the same way. Plugin stores count: MLflow's own registry (which loads them) is asked."""
    check_uri(uri)
    try:  # MLflow has no public "is this scheme served?"; without its registry, the check is skipped
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry
    except ImportError:
        return uri
    try:
        registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types, which vary by version
        raise ValueError(f"tracking URI {uri!r}: MLflow has no tracking store for its scheme; use a sqlite:///FILE.db "
                         "or an http(s)://HOST:PORT server") from None
    try:  # MLflow 3.x raises on opening a directory store unless allowed: say so before anything trains
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE as allowed
    except ImportError:
        return uri
    if re.match(r"(file:|[^:]*$)", uri) and not allowed.get():
        raise ValueError(f"{uri}: this MLflow version refuses file stores (maintenance mode); use a database store such "
                         "as sqlite:///mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)")
    return uri


def client_for(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` whose store exists and is ready: a new SQLite store is
    created (its schema migrated) under :func:`store_lock`, so processes starting together on
    it do not race."""
    from mlflow import MlflowClient

    with store_lock(check_tracking_uri(uri)):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates and migrates a new store, inside the lock
    return client


def live_run(uri: str, run_id: str) -> bool:
    """Whether the store at ``uri`` holds run ``run_id``, not deleted."""
    from mlflow.exceptions import MlflowException

    try:
        return client_for(uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:  # deleted for good, or never in this store
        return False


def sqlite_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``mlartifacts/`` beside the database file."""
    db = sqlite_file(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def experiment(uri: str, name: str) -> tuple[Any, str]:
    """An ``MlflowClient`` for ``uri`` and experiment ``name``'s id (made where missing, artifacts beside SQLite)."""
    client = client_for(uri)
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            _refuse_deleted(uri, exp)
            return client, exp.experiment_id
        return client, client.create_experiment(name, artifact_location=sqlite_artifact_root(uri))


def _refuse_deleted(uri: str, exp: Any) -> None:
    if exp.lifecycle_stage == "deleted":  # MLflow refuses its runs, and a name stays taken until it is purged
        raise ValueError(f"experiment {exp.name!r} was deleted in {uri}; restore it (mlflow experiments restore "
                         f"--experiment-id {exp.experiment_id}, with MLFLOW_TRACKING_URI={uri}) or give another --experiment")


def check_experiment(uri: str, name: str) -> None:
    """Refuse, before a command loads or trains anything, an experiment ``name`` that the store at
    ``uri`` holds as deleted: a run there trained unlogged and then pointed at a ``continual sync``
    into the same experiment. A store that does not exist yet, or does not answer now, is left to
    the run's guarded logger (a server may come up later; a run never waits for one)."""
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        return  # (opening it would create it: the run does that when it logs)
    try:
        exp = client_for(uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 - unreachable or failing: the guard handles it during the run
        return
    if exp is not None:
        _refuse_deleted(uri, exp)


@best_effort
def log_nested_run(run_dir: str | Path, name: str, metrics: dict[str, float], files: list[Path],
                   tracking_uri: str | None = None) -> str | None:
    """Log an analysis of a finished stream (routing, transfer) as a run nested under the stream's
    MLflow run, with ``files`` under ``<name>/``. None when the stream was not logged."""
    from .rundir import run_info  # the verified reader (checksum checked)

    tracking = run_info(run_dir).get("tracking") or {}
    uri, parent = tracking_uri or tracking.get("tracking_uri"), tracking.get("parent_run_id")
    if not uri or not parent:
        return None
    client = client_for(uri)
    try:
        exp_id = client.get_run(parent).info.experiment_id
    except Exception:  # in another store than the run's, "Run ... not found" said neither why nor what to do
        if uri == tracking.get("tracking_uri"):
            raise
        raise LookupError(f"{uri} does not hold this run (it was logged to {tracking.get('tracking_uri')}); "
                          f"upload it there first: continual sync {run_dir} --tracking-uri {uri}") from None
    child = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent, "kind": name}).info.run_id
    _log_metrics(client, child, [(k, v, 0) for k, v in finite_values(metrics).items()])
    for f in files:
        client.log_artifact(child, str(f), name)
    client.set_terminated(child)
    return child


class MLflowLogger(StreamLogger):
    """Parent run per stream, nested run per step, through ``MlflowClient`` (no global state)."""

    def __init__(self, tracking_uri: str = DEFAULT_TRACKING_URI, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, flush_every: int = 50) -> None:
        if not experiment.strip() or len(experiment) > MAX_EXPERIMENT_NAME:  # MLflow refused it once the run had trained
            raise ValueError(f"an MLflow experiment name is 1 to {MAX_EXPERIMENT_NAME} characters, not blank; got "
                             f"{len(experiment)}")
        self.uri, self.experiment, self.run_name = check_tracking_uri(tracking_uri), experiment, run_name
        self._client: Any = None  # made at first use, inside the scheduler's guard (a server may be down)
        self.flush_every = flush_every
        self.parent: str | None = None
        self.child: str | None = None
        self._buffer: list[Any] = []

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def start_stream(self, name, params, resume):
        from mlflow.entities import RunStatus

        self.scores = dict(params.get("scores") or {})  # task -> what its entries are (metric names)

        if resume and resume.get("parent_run_id"):
            self.parent = resume["parent_run_id"]
            with store_lock(self.uri):
                self.client.get_run(self.parent)  # the store answers (and exists) before anything else
            # A step killed half-way left its nested run RUNNING: mark it, the step is redone.
            for run in self.client.search_runs(
                [self.client.get_run(self.parent).info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.parent}'",
            ):
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, "KILLED")
            self.client.update_run(self.parent, status=RunStatus.to_string(RunStatus.RUNNING))
            self.client.set_tag(self.parent, "resumed", "true")
        else:
            run = self.client.create_run(experiment(self.uri, self.experiment)[1], run_name=self.run_name or name,
                                         tags={"stream": name, "kind": "stream"})
            self.parent = run.info.run_id
            self._params(self.parent, params)
        return {"parent_run_id": self.parent, "tracking_uri": self.uri, "experiment": self.experiment}

    def _params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flat(params).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])

    def start_step(self, row, tasks, params):
        run = self.client.create_run(
            self.client.get_run(self.parent).info.experiment_id, run_name=f"{row}-{'+'.join(tasks)}",
            tags={"mlflow.parentRunId": self.parent, "kind": "task", "row": str(row)},
        )
        self.child = run.info.run_id
        self._params(self.child, params)

    def log_step(self, record):
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["step"])
        for k, v in record.items():
            if k == "step" or v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self._buffer.append(Metric(record_metric(k), float(v), now, step))
        if len(self._buffer) >= self.flush_every * 3:
            self._flush()

    def _flush(self) -> None:
        if self._buffer and self.child:
            for i in range(0, len(self._buffer), METRICS_PER_BATCH):
                self.client.log_batch(self.child, metrics=self._buffer[i:i + METRICS_PER_BATCH])
        self._buffer = []

    def end_step(self, row, metrics, artifacts):
        from mlflow.entities import Metric

        self._flush()
        now = int(time.time() * 1000)
        self.client.log_batch(self.child, metrics=[Metric(k, v, now, row) for k, v in finite_values(metrics).items()])
        for name, path in artifacts.items():
            if Path(path).is_dir():
                self.client.log_artifacts(self.child, str(path), name)
            else:
                self.client.log_artifact(self.child, str(path), name)
        self.client.set_terminated(self.child, "FINISHED")
        self.child = None

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        _log_metrics(self.client, self.parent, matrix_metrics(row, tasks, R_row, F1_row, summary, getattr(self, "scores", {}),
                                                              A_row))

    def end_stream(self, summary, artifacts, status="FINISHED"):
        from mlflow.entities import Metric

        if self.child:  # interrupted inside a step
            self._flush()
            self.client.set_terminated(self.child, status)
            self.child = None
        if self.parent is None:
            return
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, 0) for k, v in finite_values(summary).items()]
        if ms:
            self.client.log_batch(self.parent, metrics=ms)
        for path in artifacts:
            self.client.log_artifact(self.parent, str(path))
        self.client.set_terminated(self.parent, status)


def _log_metrics(client: Any, run_id: str, items: list[tuple[str, float, int]]) -> None:
    """(name, value, step) triples, in as few calls as MLflow's batch limit allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v, step in items]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + METRICS_PER_BATCH])


def _standalone_run(uri: str, experiment_name: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                    metrics: dict[str, float], files: list[Path], artifact_dir: str | None = None,
                    series: tuple[tuple[str, float, int], ...] = ()) -> str:
    """One finished run with params, metrics (step 0), ``series`` (name, value, step), files; its id."""
    client, exp_id = experiment(uri, experiment_name)
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    _log_metrics(client, run_id, [(k, v, 0) for k, v in finite_values(metrics).items()] + list(series))
    for f in files:
        client.log_artifact(run_id, str(f), artifact_dir)
    client.set_terminated(run_id)
    return run_id


@best_effort
def log_compare(uri: str, stream: str, rows: dict[str, dict[str, Any]], files: list[Path], router: str = "") -> str:
    """The comparison report as a ``compare`` run: each row's numbers, its curves (one step per
    task learned, from 1), the report files; ``router`` (behind the no-task-id columns) as a tag."""
    metrics = {compare_metric(k, label): v for label, r in rows.items() for k, v in r.items() if not isinstance(v, (list, str))}
    series = tuple((compare_metric(k, label), float(v), step) for label, r in rows.items() for k, c in r.items()
                   if isinstance(c, list) for step, v in enumerate(c, 1) if v is not None and not math.isnan(v))
    tags = {"kind": "compare", "stream": stream, **({"router": router} if router else {})}
    return _standalone_run(uri, DEFAULT_EXPERIMENT, f"compare-{stream}", tags, {}, metrics, files, "compare", series)


@best_effort
def log_combination(uri: str, task: str, result: Any, steps: int, seed: int) -> str:
    """One cell of the combination study (experiment ``combinations``)."""
    methods = "+".join(result.methods)
    params = {"methods": methods, "mode": result.mode, "task": task, "steps": steps, "seed": seed}
    metrics = {k: float(getattr(result, k)) for k in ("test_accuracy", "dev_accuracy", "trainable_params", "seconds")}
    return _standalone_run(uri, COMBINATIONS_EXPERIMENT, f"{task}-{methods}-{result.mode}",
                           {"task": task, "mode": result.mode}, params, metrics, [])


def log_fusion_weights(client: Any, run_id: str, weights: Any, files: list[Path]) -> None:
    """A fusion's attention files (under ``fusion/``) and each source's mean weight."""
    for p in files:
        client.log_artifact(run_id, str(p), "fusion")
    _log_metrics(client, run_id, [(fusion_metric(weights.task, s), v, 0) for s, v in weights.mean().items()])


def fetch_results(run: str, tracking_uri: str, experiment_name: str) -> dict[str, Any]:
    """The ``results.json`` of an MLflow run given by id or by name (the newest of that name)."""
    from mlflow.exceptions import MlflowException

    db = sqlite_file(tracking_uri)
    if db is not None and not db.exists():  # a read makes no store: a typo of a run folder made mlflow.db here
        raise FileNotFoundError(f"{run!r} is not a run directory, and there is no MLflow store at {tracking_uri} "
                                f"(no file {db}) to look it up in; give the run's folder or --tracking-uri")
    client = client_for(tracking_uri)
    try:
        run_obj = client.get_run(run)
    except MlflowException:
        exp = client.get_experiment_by_name(experiment_name)
        runs = [] if exp is None else client.search_runs([exp.experiment_id], f"attributes.run_name = '{run}'",
                                                          order_by=["attributes.start_time DESC"], max_results=50)
        runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # a study's nested run is no stream run
        if not runs:
            raise FileNotFoundError(f"{run!r} is neither a run directory nor an MLflow run id / name in "
                                    f"{tracking_uri} (experiment {experiment_name!r})") from None
        run_obj = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_obj.info.run_id, "results.json", tmp)
        except Exception:
            parent, rid = run_obj.data.tags.get("mlflow.parentRunId"), run_obj.info.run_id
            raise FileNotFoundError(f"MLflow run {rid} ({run_obj.info.run_name!r}) is nested in run {parent}, a task's "
                                    f"step or a study, not a stream run: report on {parent}" if parent else f"MLflow run {rid} has no results.json "
                                    "(unfinished?); report on its output directory instead") from None
        from .rundir import RunStateError, run_info
        try:  # verified as a run folder's results.json is: a damaged or edited copy is no report
            return run_info(Path(local).parent)
        except RunStateError:
            raise RunStateError(f"results.json of MLflow run {run_obj.info.run_id} is damaged or was edited in the store "
                                "(it does not match its checksum): report on the run's folder instead, or upload it "
                                "again with `continual sync RUN --tracking-uri URI --again`") from None

