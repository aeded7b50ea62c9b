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
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

METRICS = ("ACC", "BWT", "FWT", "forgetting")


@dataclasses.dataclass
class Entry:
    strategy: str
    methods: list[Any]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        from .cli import _method_label

        names = _method_label(self.methods)
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        strategy = f"{self.strategy}@{opts}" if opts else self.strategy
        return f"{strategy}-{names}" if names else strategy


def parse_entry(text: str) -> Entry:
    """``per-task:lora+bitfit``, ``seq-ft``, ``per-task:lora:rank=4`` (options as in --method),
    ``avalanche-ewc@ewc_lambda=100`` (strategy options as in --strategy-option)."""
    from .cli import parse_method, parse_options
    from .strategies import STRATEGIES

    head, _, methods = text.partition(":")
    strategy, _, opts = head.partition("@")
    if strategy not in STRATEGIES:
        raise ValueError(f"entry {text!r}: unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    return Entry(strategy, [parse_method(m) for m in methods.split("+")] if methods else [], parse_options(opts, text))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def summarize_run(directory: Path) -> dict[str, Any]:
    """The report's row for one finished run directory."""
    results = json.loads((directory / "results.json").read_text())
    steps = results["steps"]
    per_task = [v for s in steps for v in s["trainable_params"].values()]
    row = {k: results["metrics"].get(k) for k in METRICS}
    row.update({
        "trainable_params_per_task": int(np.mean(per_task)) if per_task else 0,
        "delta_bytes_on_disk": _dir_bytes(directory / "checkpoints"),
        "wall_seconds": results["seconds"],
    })
    return row


def compare(stream: Any, entries: Sequence[Entry], config: Any, out: str | Path, backbone: str = "minilm",
            seed: int = 0, progress: bool = True, tracking_uri: str | None = None) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every entry on ``stream``; returns label -> report row. With
    ``tracking_uri`` each entry's stream is logged to MLflow as ``continual run`` logs it (run
    name ``compare-<stream>-<entry>``)."""
    import torch

    from adapters import DeltaModel

    from .runner import run_stream
    from .strategies import make_strategy
    from .tracking import DEFAULT_EXPERIMENT, MLflowLogger

    out = Path(out)
    rows = {}
    for e in entries:
        directory = out / e.label
        if not (directory / "results.json").exists():
            torch.manual_seed(seed)
            model = DeltaModel.from_pretrained(backbone)
            strategy = make_strategy(e.strategy, e.methods or ["bottleneck"], **e.options)
            loggers = [MLflowLogger(tracking_uri, DEFAULT_EXPERIMENT, f"compare-{stream.name}-{e.label}")] if tracking_uri else []
            run_stream(stream, model, strategy, config, directory, seed=seed, progress=progress, loggers=loggers,
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


def report_plot(rows: dict[str, dict[str, Any]], path: Path) -> Path:
    """Grouped bars: the four metrics per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    x = np.arange(len(METRICS))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(2.2 * len(METRICS) + 2, 4))
    for i, label in enumerate(labels):
        vals = [np.nan if rows[label][k] is None else rows[label][k] for k in METRICS]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, METRICS)
    ax.set_title("continual-learning metrics per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(stream: str, rows: dict[str, dict[str, Any]], out: str | Path, tracking_uri: str | None = None) -> list[Path]:
    """report.md, report.json, report.png in ``out``; a ``compare`` MLflow run when a store is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report_markdown(stream, rows) + "\n")
    clean = {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()} for k, r in rows.items()}
    (out / "report.json").write_text(json.dumps({"stream": stream, "rows": clean}, indent=1))
    files = [out / "report.md", out / "report.json", report_plot(rows, out / "report.png")]
    if tracking_uri:
        from .tracking import DEFAULT_EXPERIMENT, experiment

        client, exp_id = experiment(tracking_uri, DEFAULT_EXPERIMENT)
        run = client.create_run(exp_id, run_name=f"compare-{stream}", tags={"kind": "compare", "stream": stream})
        for label, r in clean.items():
            key = re.sub(r"[^\w\-. :/]", "_", label)  # MLflow metric names: no '@', '=', ','
            for k, v in r.items():
                if v is not None:
                    client.log_metric(run.info.run_id, f"{k}/{key}", float(v))
        for f in files:
            client.log_artifact(run.info.run_id, str(f), "compare")
        client.set_terminated(run.info.run_id)
    return files
