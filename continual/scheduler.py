"""The scheduler: run a task stream, fill the accuracy matrix, save after every step, resume.

For each training step of the strategy's plan (one task per step for sequential strategies):

1. add the step's task(s) with untrained parameters (seeded) and score task j on the model as it
   stands: that is R[j-1, j], the entry forward transfer needs;
2. train (early stopping on dev), then freeze what the strategy freezes;
3. score every task seen so far on its test split: row ``row`` of R (and of the macro-F1 matrix);
   an old task whose delta, head and backbone weights did not change keeps its score, carried
   over (:mod:`continual.scoring`), so scoring grows linearly with the stream, not quadratically;
4. write the resumable state (``state.json`` + one tensor file, :mod:`continual.rundir`), then log.

Before the first step each task is scored once on the untrained model (b, for FWT).

Seeds: task j's parameters are initialised after ``torch.manual_seed(task_seed(seed, j))`` and its
training runs with that seed too, so a resumed stream retraces an uninterrupted one exactly.
``config`` (a :class:`~continual.training.TrainConfig`) is the one source of the seed, the device
and whether progress bars show.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DeltaModel
from adapters.precision import resolve_precision
from streams import Task, TaskStream

from . import agnostic, rundir
from .identity import open_run, run_identity
from .metrics import AccuracyMatrix
from .plots import format_matrix
from .rundir import RunState, RunStateError
from .scoring import RowScorer, TokenisedTasks
from .strategies import Strategy
from .tracking import GuardedLogger, StreamLogger, step_metrics
from .training import TrainConfig, check_generative_length, check_lengths, distributed, evaluate
from .training.data import check_generation_room
from .training.config import MAX_RUN_SEED, check_seed, positions_added


def task_seed(seed: int, index: int) -> int:
    """The seed of task ``index`` in a run seeded ``seed``. 100_003 is a prime larger than any
    ``1_000 * (index + 1)`` of a stream under 100 tasks, so no two (seed, task) pairs share a seed;
    the +1 keeps task 0 of seed 0 off seed 0, which the model's own initialisation used."""
    check_seed("a stream run's seed (each task's seed is derived from it)", seed, MAX_RUN_SEED)
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

    def table(self, f1: bool = False, agnostic: bool = False) -> str:
        return format_matrix(self.matrix, self.metrics, f1, agnostic)


class _Run:
    """One stream run in progress: the model, the strategy, the tokenised tasks and the state."""

    def __init__(self, stream: TaskStream, model: DeltaModel, strategy: Strategy, config: TrainConfig, out: Path,
                 loggers: Sequence[StreamLogger], rescore_all: bool = False) -> None:
        self.stream, self.model, self.strategy, self.config, self.out = stream, model, strategy, config, out
        # several processes (torchrun): every rank trains and scores its share, rank 0 alone writes and logs
        self.main = distributed.is_main()
        # a logger that fails never stops the run (see tracking.GuardedLogger)
        self.loggers = [GuardedLogger(lg, out) for lg in loggers] if self.main else []
        self.tasks, self.plan = stream.tasks, strategy.plan(len(stream))
        self.data = TokenisedTasks(model.tokenizer, config.max_length, config.batch_size * 2, model.decoder_start_id)
        # recorded with each row, so a study that scores the run's deltas again (merge, transfer) can
        # score as the matrix was scored: in bf16 a batch's rounding can flip a generated answer
        self.scored_with = {"precision": resolve_precision(config.precision, model.device), "batch": self.data.eval_batch}
        self.clock = time.perf_counter()  # wall time not yet added to the state's seconds
        self.scorer = RowScorer(model, self.score, strategy.active, rescore_all)
        self.agnostic = agnostic.AgnosticScorer(model, self.data, strategy.active, config.router, config.seed, config.precision)
        self.per_example: dict[str, list[float]] = {}  # the last task-aware scoring's, handed to self.agnostic

    def tick(self, state: RunState) -> None:
        now = time.perf_counter()
        state.seconds += now - self.clock
        self.clock = now

    def score(self, task: Task) -> dict[str, float]:
        self.per_example[task.name] = per = []
        return evaluate(self.model, task.name, self.data.loader(task), self.strategy.active(task.name), self.config.precision,
                        per_example=per)

    def score_agnostic(self, row: int, carried: list[str], matrix: AccuracyMatrix) -> None:
        """Row ``row`` of the task-agnostic matrix (after the task-aware row was scored)."""
        seen, backbone = self.tasks[:row + 1], self.scorer.backbone
        for t in seen:
            if t.name not in carried:  # scored just now: the per-example scores of its own function
                self.agnostic.record(t, self.per_example[t.name], backbone)
        scores, routing = self.agnostic.row(seen, backbone)
        matrix.update_agnostic(row, scores, routing)

    def prepare(self, j: int) -> None:
        torch.manual_seed(task_seed(self.config.seed, j))
        self.strategy.prepare(self.model, self.tasks[j])

    def baseline(self, identity: dict[str, Any]) -> RunState:
        """Score every task on the untrained model (b), then remove what that added."""
        matrix = AccuracyMatrix(self.stream.names, [t.score_name for t in self.stream])
        for j, task in enumerate(tqdm(self.tasks, desc="untrained baseline (b)", disable=not self.config.progress, leave=False)):
            self.prepare(j)
            s = self.score(task)
            matrix.update(None, j, s["accuracy"], s["macro_f1"])
        for name in reversed(list(self.model.tasks)):  # a task using another (a fusion) goes first
            self.model.remove_task(name)
        return RunState(identity, matrix)

    def rebuild(self, state: RunState) -> None:
        """Resume: rebuild the finished steps' structure, then load the trained values."""
        for k in state.done:
            for j in self.plan[k]:
                self.prepare(j)
                self.strategy.finish(self.model, self.tasks[j])
        if state.tensors:  # read (and verified) by rank 0, sent to the others
            tensors = rundir.read_tensors(self.out, state, torch.device("cpu")) if self.main else None
            tensors = distributed.broadcast(tensors)
            mine = {k: v.to(self.model.device) for k, v in tensors.items() if not k.startswith(agnostic.PREFIX)}
            self.strategy.load_state(self.model, mine)
            self.agnostic.load_state([self.tasks[j].name for k in state.done for j in self.plan[k]], tensors)
        self.model.to(self.model.device)

    def step(self, k: int, state: RunState) -> dict[str, float]:
        """Train step ``k`` of the plan, fill its row, save, then log; returns the metrics so far."""
        step, model, strategy, tasks = self.plan[k], self.model, self.strategy, self.tasks
        row, matrix = step[-1], state.matrix
        step_tasks = [tasks[j] for j in step]
        prev_row = self.plan[k - 1][-1] if k else None
        for lg in self.loggers:
            lg.start_step(row, [t.name for t in step_tasks], self._step_params(step_tasks, row, state))
        untrained: dict[str, float] = {}
        for j in step:
            self.prepare(j)
            if prev_row is not None and prev_row == j - 1:  # R[j-1, j]: before task j is trained
                s = self.score(tasks[j])
                matrix.update(j - 1, j, s["accuracy"], s["macro_f1"])
                untrained[tasks[j].name] = s["accuracy"]
        step_config = dataclasses.replace(self.config, seed=task_seed(self.config.seed, row),
                                          max_length=self.data.length(step_tasks[-1]))
        result = strategy.train(model, step_tasks, step_config, self.data, _fan_out(self.loggers))
        for t in step_tasks:
            strategy.finish(model, t)
            self.agnostic.add_task(t)
        start = time.perf_counter()
        scores, carried = self.scorer.row(tasks[:row + 1])
        for j in range(row + 1):
            s = scores[tasks[j].name]
            matrix.update(row, j, s["accuracy"], s["macro_f1"])
        scoring_seconds = time.perf_counter() - start
        self.score_agnostic(row, carried, matrix)
        agnostic_seconds = time.perf_counter() - start - scoring_seconds
        trainable = {tasks[j].name: strategy.trainable_parameters(model, tasks[j]) for j in step}
        exported = tasks[:row + 1] if strategy.updates_old_tasks else step_tasks
        artifacts = rundir.export_checkpoints(model, strategy, exported, self.out, state.files) if self.main else {}
        for t in step_tasks if self.main else ():
            artifacts.update(strategy.reports(model, t, self.data.loader(t), self.out / "reports" / t.name))
        record = {"row": row, "tasks": [t.name for t in step_tasks], "train_seconds": result.seconds,
                  "steps": result.steps, "best_step": result.best_step, "best_dev": result.best_dev,
                  "trainable_params": trainable, "scoring_seconds": scoring_seconds, "carried": carried,
                  "agnostic_seconds": agnostic_seconds, "routing_accuracy": float(matrix.routing[row]),
                  "scored_with": self.scored_with, "history": result.history}  # (the history: all `continual sync` needs)
        state.done.append(k)
        state.steps.append(record)
        self.tick(state)
        so_far = matrix.summary(row)
        if not self.main:
            return so_far
        rundir.write_state(self.out, state, {**strategy.state(model), **self.agnostic.state()}, k)  # state first: logging may fail
        test = {t.name: float(matrix.R[row, j]) for j, t in zip(step, step_tasks)}
        metrics = step_metrics(result, untrained, test, trainable)
        for lg in self.loggers:
            lg.end_step(row, metrics, artifacts)
            lg.log_matrix(row, self.stream.names, list(matrix.R[row]), list(matrix.F1[row]), so_far, list(matrix.A[row]))
        self.note_tracking(state)
        names = self.stream.names[:row + 1]
        tqdm.write(f"after {'+'.join(record['tasks'])}: " + "  ".join(f"{n}={matrix.R[row, j]:.3f}" for j, n in enumerate(names))
                   + f"  | no task id (routing {matrix.routing[row]:.3f}): "
                   + "  ".join(f"{n}={matrix.A[row, j]:.3f}" for j, n in enumerate(names)))
        return so_far

    def note_tracking(self, state: RunState) -> None:
        """Record in the state that logging failed (``continual sync`` then uploads the run)."""
        failed = [lg.failed for lg in self.loggers if lg.failed]
        if failed and state.tracking.get("sync_needed") != failed[0]:
            state.tracking["sync_needed"] = failed[0]
            rundir.write_state(self.out, state)

    def _step_params(self, tasks: list[Task], row: int, state: RunState) -> dict[str, Any]:
        fingerprints = state.identity["data"]
        out: dict[str, Any] = {"row": row, "seed": task_seed(self.config.seed, row)}
        for t in tasks:
            out[t.name] = {"labels": ",".join(t.label_names), **t.sizes(), "fingerprint": fingerprints[t.name][:16],
                           "source": t.source}
        return out


def check_distributed(strategy: Strategy, config: TrainConfig) -> None:
    """Refuse, before anything runs, what several processes cannot train the same way as one."""
    if not config.dropout and strategy.own_loop:
        raise ValueError(f"strategy {strategy.name!r} trains with its own loop, which keeps dropout on; "
                         "drop --no-dropout or use another strategy")
    if config.shard_backbone and not distributed.active():
        raise ValueError("--shard-backbone shards the backbone across processes: start the run with torchrun "
                         "(or accelerate launch) on several processes")
    if config.shard_backbone and strategy.trains_backbone:
        raise ValueError(f"--shard-backbone is for a frozen backbone; strategy {strategy.name!r} trains it")
    if config.shard_backbone and strategy.reports_run_model:
        raise ValueError(f"--shard-backbone: strategy {strategy.name!r} writes reports that run the model on rank 0 "
                         "alone, which a sharded backbone cannot do; run it without --shard-backbone")
    if not distributed.active():
        return
    if not strategy.data_parallel:
        why = "it trains with its own loop" if strategy.own_loop else strategy.data_parallel_why
        raise ValueError(f"strategy {strategy.name!r} cannot run on {distributed.world_size()} processes ({why}); "
                         "run it as one process")
    distributed.check_batch(config.batch_size)


def _open_on_main(out: Path, identity: dict[str, Any], steps: int, resume: bool, overwrite: bool
                  ) -> tuple[RunState | None, rundir.RunLock]:
    """:func:`~continual.identity.open_run` on rank 0 (the one process that locks, reads, clears and writes the run
    directory), and its lock; the other ranks get its answer, or its refusal as their own error,
    instead of waiting forever."""
    answer: Any = None
    lock = rundir.RunLock(out)
    if distributed.is_main():
        try:
            lock.acquire()  # before reading: another live run's files are never read, cleared or replaced
            answer = open_run(out, identity, steps, resume, overwrite)
        except Exception as e:
            lock.release()
            if not distributed.active():
                raise
            distributed.broadcast(e)
            raise
    answer = distributed.broadcast(answer)
    if isinstance(answer, Exception):  # rank 0's refusal, raised on this rank too
        raise answer
    return answer, lock


def run_stream(
    stream: TaskStream,
    model: DeltaModel,
    strategy: Strategy,
    config: TrainConfig = TrainConfig(),
    out_dir: str | Path = "runs/stream",
    *,
    loggers: Sequence[StreamLogger] = (),
    resume: bool = False,
    overwrite: bool = False,
    extra_params: dict[str, Any] | None = None,
    rescore_all: bool = False,
) -> StreamResult:
    """Run ``stream`` with ``strategy`` on ``model``; everything lands in ``out_dir``.

    ``config.seed`` seeds the run, ``config.device`` places the model, ``config.progress`` shows
    bars. ``resume=True`` continues a run whose state is in ``out_dir`` after its last finished
    step (nothing finished is retrained). Without it an existing run there is an error unless
    ``overwrite=True``. ``rescore_all=True`` scores every old task again after each step instead of
    carrying over the scores of those whose inputs did not change (same numbers, more time)."""
    # every setting is checked before anything is deleted (--overwrite), loaded or trained
    if resume and overwrite:
        raise ValueError("resume continues the run in out_dir and overwrite replaces it: give one of them")
    if model.tokenizer is None:
        raise ValueError("run_stream needs a model with a tokenizer")
    if model.tasks:
        raise ValueError(f"run_stream needs a model without tasks; it has {list(model.tasks)}")
    task_seed(config.seed, 0)  # refuses a run seed whose per-task seeds would leave torch's range
    device = config.torch_device()
    strategy.check_stream(stream, model, config.max_length)
    lengths = [t.max_length or config.max_length for t in stream]
    longest = next(t for t, n in zip(stream, lengths) if n == max(lengths))
    check_lengths(model, max(lengths), strategy.methods, shortest=min(lengths),
                  source=f" (task {longest.name}'s own: set it with max_length in a stream file)" if longest.max_length else "")
    for length in {t.max_length or config.max_length for t in stream if t.generative}:
        check_generative_length(length)
        check_generation_room(model, length, positions_added(strategy.methods))
    check_distributed(strategy, config)
    agnostic.check_router(config.router, stream.tasks, model)
    if not distributed.is_main():
        config = dataclasses.replace(config, progress=False)  # one set of progress bars: rank 0's
    out = Path(out_dir)
    run = _Run(stream, model, strategy, config, out, loggers, rescore_all)
    identity = run_identity(stream, model, strategy, config)
    distributed.check_same(identity, "settings, stream and data")  # before any rank waits on another
    state, lock = _open_on_main(out, identity, len(run.plan), resume, overwrite)
    if resume and run.main:  # a mistyped --out must not start a long run from scratch unannounced
        tqdm.write(f"resuming {out}: {len(state.done)}/{len(run.plan)} stream steps done" if state else
                   f"{out} holds no run to resume: starting it from the first task")
    try:
        return _execute(run, state, identity, device, extra_params)
    finally:
        lock.release()


def _execute(run: _Run, state: RunState | None, identity: dict[str, Any], device: torch.device,
             extra_params: dict[str, Any] | None) -> StreamResult:
    """The body of :func:`run_stream` once every check has passed and the directory is locked."""
    stream, model, config, out = run.stream, run.model, run.config, run.out
    model.to(device)
    if config.shard_backbone:
        blocks = distributed.shard_backbone(model)
        mine, total = distributed.local_parameters(blocks)
        if run.main:
            tqdm.write(f"backbone: {len(blocks)} blocks sharded across {distributed.world_size()} processes (FSDP2); "
                       f"each holds {mine:,} of their {total:,} parameters")
    if state is None:
        state = run.baseline(identity)
    else:
        run.rebuild(state)
    if run.main:
        rundir.write_state(out, state)
        params = {**identity, "data": {n: f[:16] for n, f in identity["data"].items()}, "device": str(device),
                  "backbone_name": model.backbone_name, "processes": distributed.world_size(),
                  "scores": {t.name: t.score_name for t in stream}, **(extra_params or {})}
        for lg in run.loggers:
            state.tracking = lg.start_stream(stream.name, params, state.tracking or None) or state.tracking
        run.note_tracking(state)
        rundir.write_state(out, state)
        rundir.write_stream_spec(out, stream, identity["data"])
    try:
        bar = tqdm(total=len(run.plan), initial=len(state.done), desc=f"stream {stream.name}", disable=not config.progress)
        for k in range(len(run.plan)):
            if k in state.done:
                continue
            so_far = run.step(k, state)
            bar.update(1)
            bar.set_postfix(ACC=f"{so_far['ACC']:.3f}")
        bar.close()
        metrics = state.matrix.result()
        artifacts = rundir.write_results(out, stream, state, metrics) if run.main else []
        distributed.barrier()  # when any rank returns, the run directory is complete
        for lg in run.loggers:
            lg.end_stream(metrics, artifacts, "FINISHED")
        return StreamResult(state.matrix, metrics, state.steps, out, state.tracking, state.seconds)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for lg in run.loggers:
            try:
                lg.end_stream({}, [], status)
            except Exception:  # the original error matters more than a logging failure
                pass
        raise


def _fan_out(loggers: Sequence[StreamLogger]) -> Callable[[dict[str, Any]], None] | None:
    if not loggers:
        return None

    def callback(record: dict[str, Any]) -> None:
        for lg in loggers:
            lg.log_step(record)
    return callback
