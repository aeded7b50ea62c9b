"""A lifelong-learning stream built from your own CSV files, through the Python API.

    python examples/stream_from_csv.py                      # demo CSVs, MiniLM, local MLflow store
    python examples/stream_from_csv.py --data my_csvs/      # every *.csv there is a task (text,label)

Steps: (1) CSV files (by default: real SMS-spam, TREC and Amazon-review data exported as CSV, to
stand in for yours), (2) a stream YAML naming them, (3) ``load_stream`` + ``run_stream`` with one
LoRA per task and an MLflow logger, (4) the metrics read back from MLflow with its client.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

import adapters
from continual import MLflowLogger, make_strategy, run_stream
from continual.cli import train_config, training_options
from streams import builtin_task, load_stream


def write_demo_csvs(folder: Path, n: int = 400) -> list[Path]:
    """Real labelled text as CSV files with text,label columns (label names, not ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("sms", "trec", "amazon"):
        task = builtin_task(name, seed=0, max_train=n)
        frame = task.train.to_pandas()
        frame["label"] = [task.label_names[i] for i in frame["label"]]
        paths.append(folder / f"{name}.csv")
        frame[["text", "label"]].to_csv(paths[-1], index=False)
    return paths


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder of CSV files with text,label columns (default: demo files)")
    p.add_argument("--work", type=Path, default=Path("runs/csv-example"), help="where CSVs, YAML and results go")
    p.add_argument("--method", default="lora")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<work>/mlflow.db")
    training_options(p, max_steps=100, eval_every=25)  # the options every training command has
    args = p.parse_args(argv)
    config = train_config(args)  # built and checked once, as `continual run` builds it

    csvs = sorted(args.data.glob("*.csv")) if args.data else write_demo_csvs(args.work / "data")
    spec = {"name": "csv-example", "max_eval": 100, "tasks": [{"name": c.stem, "train": str(c.resolve())} for c in csvs]}
    stream_file = args.work / "stream.yaml"
    stream_file.write_text(yaml.safe_dump(spec))
    stream = load_stream(stream_file, args.seed, args.max_train or None)  # dev/test cut from each file (seeded, stratified)

    uri = args.tracking_uri or f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    model = adapters.DeltaModel.from_pretrained(args.backbone)
    result = run_stream(stream, model, make_strategy("per-task", [args.method]),
                        config, args.work / "run", loggers=[MLflowLogger(uri, "csv-example")], overwrite=True)
    print(result.table())

    # Read the run back from MLflow, as another script or a notebook would.
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(result.tracking["parent_run_id"])
    metrics = {k: run.data.metrics[k] for k in ("ACC", "BWT", "FWT", "forgetting") if k in run.data.metrics}
    print(f"from MLflow run {run.info.run_id}: {metrics}")
    return metrics


if __name__ == "__main__":
    main()
