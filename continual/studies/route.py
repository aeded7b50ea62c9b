"""Task-free inference on a finished stream: route each test example to a task, score it.

    python -m continual route runs/default-per-task-bottleneck-s0          # every router

Rebuilds the run's stream (checked against the data fingerprints it recorded), loads its task
checkpoints, fits each router task by task on the training splits (only the frozen backbone's
embeddings), routes every test example, serves them through one mixed-task model, and reports
routing accuracy and the stream's ACC with routed tasks against ACC with the true task (oracle),
in the precision and at the batch size the run scored its matrix with (:func:`run_scoring`).
Writes ``routing.json``, ``routing-<router>.md`` and a confusion heatmap per router into the run
directory and logs them, as a nested ``routing`` run of the stream's MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from tqdm.auto import tqdm

from adapters.precision import PRECISIONS

from ..plots import routing_heatmap
from ..loadrun import load_run_model, run_task_names
from ..rundir import RunStateError, not_a_run, run_info
from ..tracking import log_nested_run
from ..training import eval_loader, score_texts, task_loader
from ..training.config import ROUTERS as ROUTER_NAMES
from ..training.data import sample_rows


def stream_of_run(run_dir: str | Path):
    """(the :class:`~streams.TaskStream` a run was made from, checked against its fingerprints; what
    its results.json says, verified: read once, so every study's account comes from one reading)."""
    from streams import builtin_stream, stream_from_yaml

    run = Path(run_dir)
    spec_path, results = run / "stream.yaml", run / "results.json"
    if not spec_path.exists() or not results.exists():
        raise RunStateError(not_a_run(run, "is not a finished stream run (stream.yaml and results.json are needed)"))
    spec = yaml.safe_load(spec_path.read_text())
    info = run_info(run)  # verified against its checksum
    identity = info["identity"]
    if spec.get("file"):
        stream = stream_from_yaml(spec["file"], spec.get("seed", 0), spec.get("max_train"), spec.get("max_eval"))
    elif "stream" not in spec:
        raise RunStateError(f"{run}'s stream was built in Python, so it cannot be rebuilt here; run a built-in or a YAML stream")
    else:
        stream = builtin_stream(spec["stream"], spec.get("seed", 0), spec.get("max_train"), spec.get("max_eval"))
    now, then = stream.fingerprints(), identity["data"]
    if now != then:  # name what changed: a generative task's metric is part of it (TRACE's moved once)
        changed = [t for t in dict.fromkeys([*then, *now]) if now.get(t) != then.get(t)]
        raise RunStateError(f"the data of {run}'s stream changed since it was run: task(s) {', '.join(changed)} differ from "
                            "the fingerprints it recorded (their rows or label names, or a generative task's metric)")
    return stream, info


#: how a study scores a run whose rows do not say how they were scored (or say different things)
STUDY_SCORING = ("fp32", 64)


def run_scoring(info: dict[str, Any]) -> tuple[str, int, str]:
    """(precision, batch size, what to tell the user): how the run scored its matrix, read from
    its rows' records, so that a study scoring the run's own deltas again (merge, transfer) gets
    the matrix's numbers for them. In bf16 the batch's rounding can flip a generated answer, so
    both are matched (a run scored by several processes split its batches between them, so there
    the numbers can still differ by rounding). :data:`STUDY_SCORING` where the rows do not record
    it (runs made before they did) or disagree (a run resumed with another precision). ``info``:
    the run's results (:func:`stream_of_run`)."""
    recorded = [r.get("scored_with") for r in info["steps"]]
    kinds = {json.dumps(r, sort_keys=True) for r in recorded}
    first = recorded[0] if recorded else None
    if (len(kinds) == 1 and isinstance(first, dict) and first.get("precision") in set(PRECISIONS) - {"auto"}
            and isinstance(first.get("batch"), int) and first["batch"] >= 1):
        return first["precision"], first["batch"], f"as the run scored its matrix ({first['precision']}, batch {first['batch']})"
    precision, batch = STUDY_SCORING
    if all(r is None for r in recorded):
        why = "it does not record how it scored"
    elif any(r is None for r in recorded):  # begun before rows recorded it, resumed after
        why = "not all its rows record how they were scored"
    else:
        why = "its rows were scored in different precisions or batch sizes"
    return precision, batch, (f"in {precision} at batch {batch} ({why}; its matrix's numbers for its own deltas "
                              "can differ from these by rounding, and a generated answer can flip)")


def per_task_run(run_dir: str | Path, backbone: str | None, why: str):
    """(stream, the run's results, model with the run's tasks loaded) for a run with one task per stream task."""
    stream, info = stream_of_run(run_dir)

    def check(loaded: list[str]) -> None:
        if loaded != stream.names:
            raise RunStateError(f"{why}; {run_dir} holds tasks {loaded} for stream tasks {stream.names} "
                                "(run it with --strategy per-task)")

    check(run_task_names(run_dir))  # from the folder: refused before the backbone loads
    model, loaded = load_run_model(run_dir, backbone)
    check(loaded)
    return stream, info, model


class _Ticking(list):
    """Tokenised batches that move a progress bar as they are iterated (each pass again)."""

    def __init__(self, batches: Any, bar: Any) -> None:
        super().__init__(batches)
        self.bar = bar

    def __iter__(self):
        for b in super().__iter__():
            yield b
            self.bar.update(1)


def route_run(run_dir: str | Path, backbone: str | None = None, routers: Sequence[str] | None = None,
              fit_max: int | None = None, tracking_uri: str | None = None, progress: bool = True) -> list[Any]:
    """Route a finished run's test sets with each router (None: every one that can route the run);
    returns the :class:`RoutingResult` list (tables and routing.json written into the run;
    :func:`log_routing` logs them).
    ``backbone``: default, the one the run's checkpoints name. Embeddings and scores are computed
    in the precision and at the batch size the run scored its matrix with (:func:`run_scoring`)."""
    from fusion.routing import (ROUTERS, RoutingData, generated_answers, make_router, reads_surprise, route_and_score,
                                router_refusal)

    chosen = routers is not None
    routers = list(ROUTER_NAMES if routers is None else routers)
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; one of {list(ROUTERS)}")
    twice = sorted({r for r in routers if list(routers).count(r) > 1})
    if twice:  # each was fitted and scored again, into the same files and a second table row
        raise ValueError(f"routers {twice} are given more than once; give each router once")
    if fit_max is not None and (not isinstance(fit_max, int) or fit_max < 1):
        raise ValueError(f"fit_max must be None (no cap) or an integer >= 1, got {fit_max!r}")
    run = Path(run_dir)
    stream, info, model = per_task_run(run, backbone, "routing picks one task per stream task")
    refusals = {r: router_refusal(r, [t.generative for t in stream], model.seq2seq) for r in routers}
    if chosen and any(refusals.values()):
        raise ValueError("; ".join(f"{r}: {why}" for r, why in refusals.items() if why) + "; route with another --router")
    routers = [r for r in routers if not refusals[r]]  # by default, every router that can
    # a router that reads the deltas' surprise passes each test batch once per task, the others once
    passes = sum(len(stream) if reads_surprise(ROUTERS[r]) else 1 for r in routers)
    identity, (precision, batch_size, scored) = info["identity"], run_scoring(info)
    default_len = identity["train"]["max_length"]
    train, test, gold, labels, sources, new_tokens = {}, {}, {}, {}, {}, []
    # one bar over every batch: embedded once each, then each test batch scored per router and once by the true task
    bar = tqdm(total=0, desc="route: embedding and scoring", unit="batch", disable=not progress, leave=False)
    for t in stream:
        length = t.max_length or default_len
        ds = t.train.select(sample_rows(t.train, fit_max, identity.get("seed", 0)))
        train[t.name] = _Ticking(eval_loader(ds, model.tokenizer, length, batch_size, metric=t.metric,
                                             decoder_start=model.decoder_start_id), bar)
        # prototypes per label; a free-text task has one
        labels[t.name] = list(ds["label"]) if "label" in ds.column_names else [0] * len(ds)
        loader = task_loader(t, "test", model, length, batch_size)
        new_tokens.append(getattr(loader, "max_new_tokens", 0))
        test[t.name] = _Ticking(loader, bar)
        gold[t.name] = list(t.test["target"]) if t.generative else [t.label_names[y] for y in t.test["label"]]
        sources[t.name] = loader.metric_sources() if t.generative else None  # SARI judges against the prompt
        bar.total += len(train[t.name]) + len(test[t.name]) * (2 + passes)
    answer = match = None
    if all(t.generative for t in stream):  # answers generated through the routed task's delta
        metrics = {t.name: t.metric for t in stream}
        answer = lambda mixed, batches, slots: generated_answers(mixed, batches, slots, max(new_tokens))  # noqa: E731
        match = lambda task, preds, refs: score_texts(preds, refs, metrics[task], sources[task])["accuracy"]  # noqa: E731
    elif any(t.generative for t in stream):
        raise ValueError("routing serves a stream of classification tasks or of generative tasks, not a mix of both")
    start = time.perf_counter()
    with bar:
        data = RoutingData.build(model, stream.names, train, labels, test, gold, precision)
        tqdm.write(f"embedded {sum(len(v) for v in labels.values())} training and {sum(len(v) for v in gold.values())} "
                   f"test examples in {time.perf_counter() - start:.0f} s; embedded and scored {scored}")
        results = []
        for name in routers:
            start = time.perf_counter()
            res = route_and_score(model, data, make_router(name, identity.get("seed", 0)), answer, match, precision)
            res.seconds = time.perf_counter() - start
            results.append(res)
            table, picture = _router_files(run, name)
            table.write_text(res.table() + "\n")
            routing_heatmap(res, picture)
    summary = {r.router: {**r.summary(), "routed": r.routed_accuracy, "oracle": r.oracle_accuracy,
                          "confusion": r.confusion.tolist(), "tasks": r.tasks, "seconds": r.seconds} for r in results}
    (run / "routing.json").write_text(json.dumps(summary, indent=1))
    return results


def _router_files(run: Path, router: str) -> tuple[Path, Path]:
    """Where a router's table and confusion heatmap go: written by route_run, logged by log_routing."""
    return run / f"routing-{router}.md", run / f"routing-{router}.png"


def log_routing(run: str | Path, results: list[Any], tracking_uri: str | None = None) -> tuple[list[Path], str | None]:
    """The files :func:`route_run` wrote for ``results`` and, logged with them, the nested
    ``routing`` MLflow run's id (None where the stream was not logged)."""
    run = Path(run)
    files = [f for r in results for f in _router_files(run, r.router)] + [run / "routing.json"]
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update({f"{k}/{r.router}": v for k, v in r.summary().items()})
        metrics.update({f"routed_acc/{r.router}/{t}": v for t, v in r.routed_accuracy.items()})
    return files, log_nested_run(run, "routing", metrics, files, tracking_uri)


def format_results(results: list[Any]) -> str:
    lines = []
    for r in results:
        lines += [r.table(), f"({r.seconds:.1f} s)", ""]
    lines.append("| router | routing accuracy | ACC routed | ACC oracle |")
    lines.append("|---|---|---|---|")
    for r in results:
        s = r.summary()
        lines.append(f"| {r.router} | {s['routing_accuracy']:.3f} | {s['routed_ACC']:.3f} | {s['oracle_ACC']:.3f} |")
    return "\n".join(lines)
