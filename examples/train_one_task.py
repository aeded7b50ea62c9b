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
from continual import TrainConfig, eval_loader, evaluate, majority_rate, train_task
from streams import SOURCES, load_task_data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="movie", choices=sorted(SOURCES), help="real data set (default: movie)")
    p.add_argument("--method", action="append", help=f"delta method, repeat to combine; one of {adapters.available_methods()} (default: bottleneck)")
    p.add_argument("--backbone", default=adapters.DEFAULT_BACKBONE, help="short name, local path or hub id (default: minilm)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default: 64)")
    p.add_argument("--max-train", type=int, default=2000, help="cap on training examples (default: 2000)")
    p.add_argument("--max-eval", type=int, default=300, help="cap on dev/test examples (default: 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--save", default=None, help="directory to save the trained task checkpoint to")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data, src = load_task_data(args.task, seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    model = adapters.DeltaModel.from_pretrained(args.backbone)
    methods = args.method or ["bottleneck"]
    model.add_task(args.task, methods, label_names=src.label_names)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         eval_every=max(1, args.steps // 4), seed=args.seed, device=args.device)
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
