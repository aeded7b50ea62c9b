"""Comparison report: several methods and baselines on one stream, side by side.

    python -m continual compare --stream default --entry per-task:lora --entry per-task:bottleneck \\
        --entry seq-delta:lora --entry seq-ft --entry avalanche-ewc@ewc_lambda=100 --max-train 300 --steps 100

Each entry (``strategy``, ``strategy:method+method``, ``strategy@key=value,...``) runs the stream
into its own directory under ``--out`` (a finished entry is reused, a killed one resumes; each
stream is logged to MLflow like ``continual run``), then one report gives, per entry: ACC, BWT,
FWT, forgetting, trainable parameters per task, delta size on disk (the saved task checkpoints,
and the backbone where the entry fine-tunes it) and wall time, as ``report.md``, ``report.json``
and ``report.png``, logged to MLflow as a ``compare`` run.
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

from ..plots import metric_bars
from ..rundir import run_info
from ..scheduler import run_stream
from ..strategies import STRATEGIES, make_strategy
from ..tracking import DEFAULT_EXPERIMENT, MLflowLogger, log_compare
from ..training import TrainConfig

METRICS = ("ACC", "BWT", "FWT", "forgetting")


@dataclasses.dataclass
class Entry:
    """One row of the comparison: a strategy, its delta methods (typed configs) and options."""

    strategy: str
    methods: list[DeltaConfig]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        names = methods_label(self.methods)
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        strategy = f"{self.strategy}@{opts}" if opts else self.strategy
        return f"{strategy}-{names}" if names else strategy


def parse_entry(text: str) -> Entry:
    """``per-task:lora+bitfit``, ``seq-ft``, ``per-task:lora:rank=4`` (options as in --method),
    ``avalanche-ewc@ewc_lambda=100`` (strategy options as in --strategy-option)."""
    head, _, methods = text.partition(":")
    strategy, _, opts = head.partition("@")
    if strategy not in STRATEGIES:
        raise ValueError(f"entry {text!r}: unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    return Entry(strategy, parse_combo(methods) if methods else [], parse_options(opts, text))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def summarize_run(directory: Path) -> dict[str, Any]:
    """The report's row for one finished run directory."""
    results = run_info(directory)  # verified against its checksum
    steps = results["steps"]
    per_task = [v for s in steps for v in s["trainable_params"].values()]
    row = {k: results["metrics"].get(k) for k in METRICS}
    row.update({
        "trainable_params_per_task": int(np.mean(per_task)) if per_task else 0,
        "delta_bytes_on_disk": _dir_bytes(directory / "checkpoints"),
        "wall_seconds": results["seconds"],
    })
    return row


def compare(stream: Any, entries: Sequence[Entry], config: TrainConfig, out: str | Path, backbone: str = "minilm",
            tracking_uri: str | None = None) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every entry on ``stream`` (seed, device and progress from ``config``);
    returns label -> report row. With ``tracking_uri`` each entry's stream is logged to MLflow as
    ``continual run`` logs it (run name ``compare-<stream>-<entry>``)."""
    out = Path(out)
    strategies = {e.label: make_strategy(e.strategy, e.methods or ["bottleneck"], **e.options) for e in entries}
    rows = {}
    for e in entries:
        directory = out / e.label
        if not (directory / "results.json").exists():
            torch.manual_seed(config.seed)
            model = DeltaModel.from_pretrained(backbone)
            loggers = [MLflowLogger(tracking_uri, DEFAULT_EXPERIMENT, f"compare-{stream.name}-{e.label}")] if tracking_uri else []
            run_stream(stream, model, strategies[e.label], config, directory, loggers=loggers,
                       resume=(directory / "state.json").exists())
        rows[e.label] = summarize_run(directory)
    return rows


def report_markdown(stream: str, rows: dict[str, dict[str, Any]]) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4f}"  # noqa: E731
    lines = [f"# Comparison on stream `{stream}`", "",
             "| method | ACC | BWT | FWT | forgetting | trainable params / task | delta on disk | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt(r[k]) for k in METRICS)
                     + f" | {r['trainable_params_per_task']:,} | {r['delta_bytes_on_disk'] / 1e6:.2f} MB | {r['wall_seconds']:.0f} s |")
    lines += ["", "ACC: mean final accuracy; BWT < 0 and forgetting > 0 mean forgetting; FWT: gain from earlier "
              "tasks before training. Delta on disk: all task checkpoints the run saved, with the fine-tuned "
              "backbone for the strategies that train it (seq-ft, avalanche-*)."]
    return "\n".join(lines)


def write_report(stream: str, rows: dict[str, dict[str, Any]], out: str | Path, tracking_uri: str | None = None) -> list[Path]:
    """report.md, report.json, report.png in ``out``; a ``compare`` MLflow run when a store is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report_markdown(stream, rows) + "\n")
    clean = {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()} for k, r in rows.items()}
    (out / "report.json").write_text(json.dumps({"stream": stream, "rows": clean}, indent=1))
    files = [out / "report.md", out / "report.json", metric_bars(rows, METRICS, out / "report.png")]
    if tracking_uri:
        log_compare(tracking_uri, stream, clean, files)
    return files
