"""Fuse the deltas of a finished stream for a new low-resource task, and plot the fusion weights.

    python -m continual run --out runs/default                  # a finished stream (once)
    python examples/fuse_stream.py --run runs/default --target amazon --train 100

1. Load the stream's frozen task deltas (the sources) onto the backbone they were trained on.
2. Train the target's own delta on its few examples (stage 1), then freeze it.
3. Add an AdapterFusion over the sources and that delta, with a head copied from stage 1, and
   train only the fusion and the head (stage 2).
4. Compare both on the target's test set and plot which deltas the fusion attends to, per layer.

The target's own stream task, if the stream had one, is left out: it saw far more data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from continual import eval_loader, evaluate, load_run_model, train_task
from continual.cli import train_config, training_options
from continual.plots import write_fusion_report
from fusion import add_fusion, fusion_weights
from streams import SOURCES, builtin_task


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output directory of a finished stream (per-task strategy)")
    p.add_argument("--target", default="amazon", choices=sorted(SOURCES), help="the new low-resource task")
    p.add_argument("--out", default="runs/fuse-example", help="where the heatmap and table go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # the options every training command has (--backbone: the one the stream was trained on;
    # --max-train: the target's training examples)
    training_options(p, max_steps=200, eval_every=25, patience=4, max_train=100)
    args = p.parse_args(argv)
    config = train_config(args)

    model, loaded = load_run_model(args.run, args.backbone)
    for name in reversed(loaded):
        if name == args.target:
            model.remove_task(name)
    sources = [n for n in model.tasks]
    task = builtin_task(args.target, seed=args.seed, max_train=args.max_train or None, max_eval=args.max_eval or None)
    data = task.splits()
    test = eval_loader(data["test"], model.tokenizer, args.max_length)

    own = f"{args.target}_own"
    torch.manual_seed(args.seed)
    model.add_task(own, list(model.task(sources[0]).configs), label_names=task.label_names)
    train_task(model, own, data, config)  # stage 1: the target's own delta
    single = evaluate(model, own, test)["accuracy"]

    fused = f"{args.target}_fusion"
    add_fusion(model, fused, sources + [own], head_from=own)  # freezes the sources and the own delta
    train_task(model, fused, data, config)  # stage 2: fusion + head only
    fusion = evaluate(model, fused, test)["accuracy"]

    weights = fusion_weights(model, fused, test)
    files = write_fusion_report(weights, Path(args.out))
    print(weights.table())
    summary = {"target": args.target, "train_examples": len(data["train"]), "sources": sources,
               "single_delta_test_accuracy": round(single, 4), "fusion_test_accuracy": round(fusion, 4),
               "mean_fusion_weight": {k: round(v, 3) for k, v in weights.mean().items()},
               "files": [str(f) for f in files]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
