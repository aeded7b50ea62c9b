"""Comparison report: several methods and baselines on one stream, side by side.

    python -m continual compare --stream default --entry per-task:lora --entry per-task:bottleneck \\
        --entry seq-delta:lora --entry seq-ft --entry avalanche-ewc@ewc_lambda=100 --max-train 300 --steps 100

Each entry (``strategy``, ``strategy:method+method``, ``strategy@key=value,...``) runs the stream
into its own directory under ``--out`` (a finished entry is reused, a killed one resumes; each
stream is logged to MLflow like ``continual run``), then one report gives, per entry: ACC, BWT,
FWT, forgetting, trainable parameters per task, delta size on disk (the saved task checkpoints,
and the backbone where the entry fine-tunes it) and wall time, as ``report.md``, ``report.json``
and ``report.png`` (the metrics) and ``curves.png`` (each entry's mean score over the tasks seen so far
after each task), logged to MLflow as a ``compare`` run.

With ``--seeds 0,1,2`` each entry runs once per seed (the stream drawn with that seed) and the
report gives mean ± std. ``--workers N`` hands the entries x seeds to N local processes, and
``--ray-address`` to a Ray cluster (:mod:`continual.studies.pool`): same report, less wall time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from adapters import DeltaConfig, DeltaModel
from adapters.spec import methods_label, parse_combo, parse_options

from ..metrics import AccuracyMatrix, accuracy_curve
from ..plots import accuracy_curves, metric_bars
from ..rundir import RunStateError, read_state, run_info
from ..identity import identity_differences, run_identity
from ..scheduler import run_stream
from ..strategies import STRATEGIES, make_strategy
from ..guard import check_resume_store
from ..tracking import DEFAULT_EXPERIMENT, MLflowLogger, log_compare
from ..training import TrainConfig
from .pool import run_all

METRICS = ("ACC", "BWT", "FWT", "forgetting")
# the same run scored without the task id (continual.agnostic), and how often the router was right
AGNOSTIC = ("ACC_agnostic", "BWT_agnostic", "forgetting_agnostic", "routing_accuracy")


@dataclasses.dataclass
class Entry:
    """One row of the comparison: a strategy, its delta methods (typed configs) and options."""

    strategy: str
    methods: list[DeltaConfig]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        # method options in the label: two entries of one method with other options are two rows
        # (and two run folders), where they used to share both and one row replaced the other
        names = methods_label(self.methods, options=True)
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        strategy = f"{self.strategy}@{opts}" if opts else self.strategy
        return f"{strategy}-{names}" if names else strategy


def parse_entry(text: str) -> Entry:
    """``per-task:lora+bitfit``, ``seq-ft``, ``per-task:lora:rank=4`` (options as in --method),
    ``avalanche-ewc@ewc_lambda=100`` (strategy options as in --strategy-option)."""
    head, colon, methods = text.partition(":")
    strategy, _, opts = head.partition("@")
    if colon and not methods.strip():  # it ran the default method under a label naming none
        raise ValueError(f"entry {text!r} names no method after ':'; give one (e.g. {head}:lora) or drop the ':'")
    if strategy not in STRATEGIES:
        raise ValueError(f"entry {text!r}: unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if "@" in methods:  # read as part of a method's name or value, it was an unknown method or a bad number
        m, _, late = methods.partition("@")
        raise ValueError(f"entry {text!r}: strategy options go right after the strategy, before the methods: "
                         f"{head}@{late}:{m}" if not opts else f"entry {text!r}: '@' may appear once, after the strategy")
    return Entry(strategy, parse_combo(methods) if methods else [], parse_options(opts, text))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def summarize_run(directory: Path) -> dict[str, Any]:
    """The report's row for one finished run directory."""
    results = run_info(directory)  # verified against its checksum
    steps = results["steps"]
    per_task = [v for s in steps for v in s["trainable_params"].values()]
    row = {k: results["metrics"].get(k) for k in (*METRICS, *AGNOSTIC)}
    row.update({
        "trainable_params_per_task": int(np.mean(per_task)) if per_task else 0,
        "delta_bytes_on_disk": _dir_bytes(directory / "checkpoints"),
        "wall_seconds": results["seconds"],
        # which router made the second group of columns (older runs' identities may lack it)
        "router": (results.get("identity") or {}).get("train", {}).get("router"),
    })
    matrix = AccuracyMatrix.from_dict(results["matrix"])
    for key, R in (("ACC_curve", matrix.R), ("ACC_agnostic_curve", matrix.A)):
        row[key] = [None if math.isnan(v) else v for v in accuracy_curve(R)]  # JSON has no NaN
    return row


@dataclasses.dataclass
class Job:
    """One run of a study: an entry on the stream drawn with one seed, into its own directory."""

    stream: Any
    entry: Entry
    config: TrainConfig
    directory: Path
    backbone: str
    tracking_uri: str | None
    run_name: str


def run_job(job: Job) -> dict[str, Any]:
    """Run (or reuse, or resume) one job and return its report row; a pool worker's whole task.
    A finished run in its folder is reused, and a killed one resumed, only if it was made with
    the job's settings, stream, strategy and backbone (the identity ``run_stream`` checks on
    resume): reused on the folder's name alone, a compare re-run with other settings gave the old
    numbers."""
    directory = job.directory
    e = job.entry
    strategy = make_strategy(e.strategy, e.methods or None, **e.options)
    torch.manual_seed(job.config.seed)
    model = DeltaModel.from_pretrained(job.backbone)
    if (directory / "results.json").exists():
        diff = identity_differences(read_state(directory / "state.json").identity,
                                    run_identity(job.stream, model, strategy, job.config))
        if diff:
            raise RunStateError(f"{directory} holds a different run (differs in: {'; '.join(diff)}); give compare "
                                "another --out, or delete that folder")
        return summarize_run(directory)
    loggers = [MLflowLogger(job.tracking_uri, DEFAULT_EXPERIMENT, job.run_name)] if job.tracking_uri else []
    run_stream(job.stream, model, strategy, job.config, directory, loggers=loggers,
               resume=(directory / "state.json").exists())
    return summarize_run(directory)


def check_entries(entries: Sequence[Entry]) -> None:
    """Refuse an entry that names no strategy or method, or bad options, and an entry given twice
    (both would write one folder), before any stream is drawn or anything runs."""
    for e in entries:
        make_strategy(e.strategy, e.methods or None, **e.options)
    twice = sorted({e.label for e in entries if [x.label for x in entries].count(e.label) > 1})
    if twice:
        raise ValueError(f"entries {twice} are given more than once; give each entry once")


def compare(streams: Any, entries: Sequence[Entry], config: TrainConfig, out: str | Path, backbone: str = "minilm",
            tracking_uri: str | None = None, *, workers: int = 1, ray_address: str | None = None,
            done: Any = None) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every entry on the stream (device and progress from ``config``); returns
    label -> report row. With ``tracking_uri`` each run is logged to MLflow as ``continual run``
    logs it (run name ``compare-<stream>-<entry>``).

    ``streams``: one stream (seeded ``config.seed``), or seed -> the stream drawn with that seed:
    each entry then runs once per seed (into ``<out>/<entry>/s<seed>``) and its row holds the mean
    over seeds, with ``<metric>_std``. ``workers`` / ``ray_address``: the pool that runs the
    entries x seeds (:mod:`continual.studies.pool`); the rows do not depend on it."""
    out = Path(out)
    check_entries(entries)
    by_seed = streams if isinstance(streams, dict) else {config.seed: streams}
    several = len(by_seed) > 1
    parallel = workers > 1 or bool(ray_address)
    jobs, labels = [], []
    for e in entries:
        for seed, stream in by_seed.items():
            directory = out / e.label / f"s{seed}" if several else out / e.label
            run_config = dataclasses.replace(config, seed=seed, progress=config.progress and not parallel)
            name = f"compare-{stream.name}-{e.label}" + (f"-s{seed}" if several else "")
            jobs.append(Job(stream, e, run_config, directory, backbone, tracking_uri, name))
            labels.append(f"{e.label} seed {seed}" if several else e.label)
    for job in jobs:  # a killed entry resumes its MLflow run: in the store it was started with
        if job.tracking_uri and not (job.directory / "results.json").exists():
            check_resume_store(job.directory, job.tracking_uri)
    results = run_all(run_job, jobs, labels, workers, ray_address, done)
    rows: dict[str, dict[str, Any]] = {}
    for e in entries:
        mine = [r for j, r in zip(jobs, results) if j.entry.label == e.label]
        rows[e.label] = mine[0] if not several else mean_row(mine)
    return rows


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One entry's runs over several seeds: the mean of every number, ``<metric>_std`` for the
    metrics (sample standard deviation), ``seeds`` how many."""
    curves = [k for k in rows[0] if k.endswith("_curve")]
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) if None not in [r[k] for r in rows] else None
                           for k in rows[0] if k not in curves and k != "router"}
    if "router" in rows[0]:  # one config for every seed, so one router
        out["router"] = rows[0]["router"]
    for k in curves:  # point by point over seeds; a point some seed lacks is None
        points = np.array([r[k] for r in rows], dtype=float)  # None -> NaN
        out[k] = [None if np.isnan(v) else float(v) for v in points.mean(0)]
        out[f"{k}_std"] = [None if np.isnan(v) else float(v) for v in points.std(0, ddof=1)]
    for k in (*METRICS, *AGNOSTIC):
        values = [r[k] for r in rows]
        out[f"{k}_std"] = float(np.std(values, ddof=1)) if None not in values else None
    out["trainable_params_per_task"] = int(out["trainable_params_per_task"])
    out["seeds"] = len(rows)
    return out


def _cell(r: dict[str, Any], k: str) -> str:
    v, std = r[k], r.get(f"{k}_std")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _routers(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The routers behind the rows' no-task-id columns (none named by rows of older runs)."""
    return sorted({r["router"] for r in rows.values() if isinstance(r.get("router"), str)})


def report_markdown(stream: str, rows: dict[str, dict[str, Any]]) -> str:
    seeds = {r.get("seeds", 1) for r in rows.values()}
    title = f"# Comparison on stream `{stream}`" + (f" (mean ± std over {max(seeds)} seeds)" if max(seeds) > 1 else "")
    lines = [title, "",
             "| method | ACC | BWT | FWT | forgetting | ACC, no task id | BWT, no task id | forgetting, no task id "
             "| routing | trainable params / task | delta on disk | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    routers = _routers(rows)
    router = f"the {' or '.join(routers)} router" if routers else "a router"
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(r, k) for k in (*METRICS, *AGNOSTIC))
                     + f" | {r['trainable_params_per_task']:,} | {r['delta_bytes_on_disk'] / 1e6:.2f} MB | {r['wall_seconds']:.0f} s |")
    lines += ["", "ACC: mean final score (each task's own: accuracy, exact match, token F1 or ROUGE-L); BWT < 0 and "
              "forgetting > 0 mean forgetting; FWT: gain from earlier tasks before training. The first group is "
              "task-aware (each test example run with its own task's delta and head); the second is the same run "
              f"scored without the task id ({router}, fitted on the tasks seen so far, picks the delta or head; "
              "routing: the share of test examples it sent to their own task, after the last task): the "
              "setting of the published continual-learning tables. Delta on disk: all task checkpoints the run "
              "saved, with the fine-tuned backbone for the strategies that train it (seq-ft, avalanche-*)."]
    return "\n".join(lines + _curve_tables(rows))


def _curve_tables(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The curves (curves.png) as numbers: one row per entry, one column per task learned."""
    out = []
    for key, what in (("ACC_curve", "with the task id"), ("ACC_agnostic_curve", "without the task id")):
        n = max((len(r.get(key) or []) for r in rows.values()), default=0)
        if not n or all(v is None for r in rows.values() for v in r.get(key) or []):
            continue
        out += ["", f"Mean score over the tasks seen so far, after each task, {what}:", "",
                "| method | " + " | ".join(str(i) for i in range(1, n + 1)) + " |", "|---" * (n + 1) + "|"]
        for label, r in rows.items():
            curve, std = r.get(key) or [], r.get(f"{key}_std") or []
            cells = ["n/a" if v is None else f"{v:.4f}" + (f" ± {std[i]:.4f}" if i < len(std) and std[i] is not None else "")
                     for i, v in enumerate(curve)]
            out.append(f"| {label} | " + " | ".join(cells + ["n/a"] * (n - len(cells))) + " |")
    return out


def write_report(stream: str, rows: dict[str, dict[str, Any]], out: str | Path, tracking_uri: str | None = None) -> list[Path]:
    """report.md, report.json, report.png, curves.png in ``out``; a ``compare`` MLflow run when a
    store is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report_markdown(stream, rows) + "\n")
    clean = {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()} for k, r in rows.items()}
    (out / "report.json").write_text(json.dumps({"stream": stream, "rows": clean}, indent=1))
    files = [out / "report.md", out / "report.json", metric_bars(rows, (*METRICS, "ACC_agnostic", "BWT_agnostic"), out / "report.png")]
    if all(r.get("ACC_curve") for r in rows.values()):  # (rows a caller made without summarize_run may lack them)
        files.append(accuracy_curves(rows, out / "curves.png"))
    if tracking_uri:
        log_compare(tracking_uri, stream, clean, files, ",".join(_routers(rows)))
    return files
