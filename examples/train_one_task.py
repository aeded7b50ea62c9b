"""Train one delta (or a combination) on a real task with the default backbone, offline.

    python examples/train_one_task.py --task movie --method lora
    python examples/train_one_task.py --task bbc --method bottleneck --method bitfit --steps 300
    python examples/train_one_task.py --method lora --save runs/movie-lora   # shareable checkpoint

Prints the trainable-parameter ratio and the dev/test accuracy next to the majority baseline.
"""

from __future__ import annotations

import argparse
import json

import torch

import adapters
from continual import eval_loader, evaluate, majority_rate, train_task
from continual.cli import train_config, training_options
from streams import SOURCES, load_task_data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="movie", choices=sorted(SOURCES), help="real data set (default: movie)")
    p.add_argument("--method", action="append", help=f"delta method, repeat to combine; one of {adapters.available_methods()} (default: bottleneck)")
    training_options(p, max_steps=300, eval_every=75, max_train=2000, routed=False)  # the options every training command has
    p.add_argument("--save", default=None, help="directory to save the trained task checkpoint to")
    args = p.parse_args(argv)
    config = train_config(args)  # built and checked once, as `continual run` builds it

    torch.manual_seed(args.seed)
    data, src = load_task_data(args.task, seed=args.seed, max_train=args.max_train or None, max_eval=args.max_eval or None)
    model = adapters.DeltaModel.from_pretrained(args.backbone)
    methods = args.method or [adapters.DEFAULT_METHOD]
    model.add_task(args.task, methods, label_names=src.label_names)
    result = train_task(model, args.task, data, config)
    test = evaluate(model, args.task, eval_loader(data["test"], model.tokenizer, args.max_length))
    majority = majority_rate(data["dev"])
    report = model.parameter_report(args.task)
    summary = {
        "task": args.task, "methods": methods, "delta_params": report["delta_params"],
        "delta_ratio_pct": round(100 * report["delta_ratio"], 4), "dev_majority": round(majority, 4),
        "dev_accuracy": round(result.best_dev["accuracy"], 4), "test_accuracy": round(test["accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4), "steps": result.steps, "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.save:
        model.freeze(args.task)
        print("saved to", adapters.save_task(model, args.task, args.save))
    return summary


if __name__ == "__main__":
    main()
