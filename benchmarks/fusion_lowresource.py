"""AdapterFusion against the target's own single delta on low-resource targets, over seeds.

    python -m continual run --out runs/default                       # the source deltas (a stream)
    python benchmarks/fusion_lowresource.py --run runs/default       # amazon, 100 and 500 examples, 3 seeds

For each training-set size and seed, on the same capped split of the target (seeded):
  single   the target's own delta + head (same method as the stream's), trained on the target
  fusion   AdapterFusion over the stream's source deltas *and* that single delta (Pfeiffer et al.'s
           ST-A + fusion setup), head initialised from the single head; fusion + head trained
  merge    the linear average of the same deltas, frozen, with a new head trained (cheap baseline)
Test accuracy is printed as mean +- sample std over seeds, with fusion - single per seed. Each run is
logged to MLflow (experiment ``fusion-lowresource``) with the fusion attention heatmap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from datasets import DatasetDict

import adapters
from continual import TrainConfig, eval_loader, evaluate, load_run_model, train_task
from continual.plots import write_fusion_report
from continual.tracking import experiment, log_fusion_weights
from fusion import add_fusion, fusion_weights, merge_tasks
from streams import SOURCES, builtin_task


def target_data(name: str, n_train: int, n_dev: int, n_test: int, seed: int) -> tuple[DatasetDict, list[str]]:
    """Seeded stratified splits of a catalogued data set, train capped at ``n_train``."""
    task = builtin_task(name, seed=seed, max_train=n_train, max_eval=n_test)
    dev = task.dev.select(range(min(n_dev, len(task.dev))))  # already shuffled and stratified
    return DatasetDict(train=task.train, dev=dev, test=task.test), task.label_names


def run_one(model: adapters.DeltaModel, sources: list[str], target: str, n: int, seed: int, args) -> dict:
    data, labels = target_data(target, n, args.dev, args.test, seed)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         eval_every=args.eval_every, patience=args.patience, seed=seed, progress=False)
    test = eval_loader(data["test"], model.tokenizer, args.max_length, 64)
    methods = list(model.task(sources[0]).configs)
    out: dict = {"n_train": len(data["train"]), "seed": seed}
    own, fused, merged = f"{target}_own", f"{target}_fusion", f"{target}_merge"
    torch.manual_seed(seed)
    model.add_task(own, methods, label_names=labels)
    t0 = time.perf_counter()
    r = train_task(model, own, data, config)
    model.freeze(own)
    out["single"] = evaluate(model, own, test)["accuracy"]
    out["single_s"] = time.perf_counter() - t0
    torch.manual_seed(seed)
    add_fusion(model, fused, sources + [own], head_from=own, **json.loads(args.fusion))
    t0 = time.perf_counter()
    train_task(model, fused, data, config)
    model.freeze(fused)
    out["fusion"] = evaluate(model, fused, test)["accuracy"]
    out["fusion_s"] = time.perf_counter() - t0
    out["fusion_weights"] = fusion_weights(model, fused, test)
    torch.manual_seed(seed)
    merge_tasks(model, merged, sources + [own], label_names=labels)
    t0 = time.perf_counter()
    train_task(model, merged, data, config)
    out["merge"] = evaluate(model, merged, test)["accuracy"]
    out["merge_s"] = time.perf_counter() - t0
    out["single_steps"] = r.steps
    for name in (merged, fused, own):
        model.remove_task(name)
    return out


def mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):.1f}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output directory of a finished stream (its checkpoints are the sources)")
    p.add_argument("--target", default="amazon", choices=sorted(SOURCES), help="low-resource target data set")
    p.add_argument("--sources", nargs="*", default=None, help="stream tasks to fuse (default: all but the target)")
    p.add_argument("--sizes", default="100,500", help="training-set sizes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backbone", default=adapters.DEFAULT_BACKBONE)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--dev", type=int, default=100, help="dev examples (early stopping)")
    p.add_argument("--test", type=int, default=300, help="test examples")
    p.add_argument("--fusion", default="{}", help='FusionConfig fields as JSON, e.g. \'{"temperature": 2.0}\'')
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/fusion-lowresource", help="where the table, JSON and heatmaps go")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, all_tasks = load_run_model(args.run, args.backbone)
    sources = args.sources or [t for t in all_tasks if t != args.target and model.task(t).deltas]
    for t in reversed(all_tasks):  # the target's own stream delta (trained on all its data) is not used
        if t not in sources:
            model.remove_task(t)
    logger, exp_id = (None, None) if args.no_mlflow else experiment(args.tracking_uri, "fusion-lowresource")
    rows = []
    sizes, seeds = [int(x) for x in args.sizes.split(",")], [int(x) for x in args.seeds.split(",")]
    for n in sizes:
        for seed in seeds:
            r = run_one(model, sources, args.target, n, seed, args)
            w = r.pop("fusion_weights")
            files = write_fusion_report(w, out_dir / f"n{n}-s{seed}")
            rows.append({"n": n, **r})
            print(f"n={n} seed={seed}: single {r['single']:.3f}  fusion {r['fusion']:.3f}  merge {r['merge']:.3f}  "
                  f"(fusion weights: {', '.join(f'{k} {v:.2f}' for k, v in w.mean().items())})", flush=True)
            if logger is not None:
                run = logger.create_run(exp_id, run_name=f"{args.target}-n{n}-s{seed}",
                                        tags={"target": args.target, "sources": ",".join(sources)})
                for k, v in {"n_train": n, "seed": seed, "backbone": args.backbone, "steps": args.steps,
                             "fusion": args.fusion}.items():
                    logger.log_param(run.info.run_id, k, v)
                for k in ("single", "fusion", "merge"):
                    logger.log_metric(run.info.run_id, f"test_accuracy/{k}", r[k])
                log_fusion_weights(logger, run.info.run_id, w, files)
                logger.set_terminated(run.info.run_id)
    lines = [f"target {args.target}, sources {', '.join(sources)}; test accuracy (%), mean +- std over seeds {args.seeds}",
             "", "| train examples | single delta | fusion | merge | fusion - single (per seed) |", "|---|---|---|---|---|"]
    for n in sizes:
        rs = [r for r in rows if r["n"] == n]
        diffs = [100 * (r["fusion"] - r["single"]) for r in rs]
        lines.append(f"| {n} | {mean_std([r['single'] for r in rs])} | {mean_std([r['fusion'] for r in rs])} | "
                     f"{mean_std([r['merge'] for r in rs])} | {statistics.mean(diffs):+.1f} ({', '.join(f'{d:+.1f}' for d in diffs)}) |")
    table = "\n".join(lines)
    print(table)
    (out_dir / "table.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
