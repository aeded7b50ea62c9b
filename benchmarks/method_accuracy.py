"""Every delta method on the real default backbone and a real task: parameter ratio, accuracy, time.

    python benchmarks/method_accuracy.py                       # all methods, movie sentiment, CPU
    python benchmarks/method_accuracy.py --methods lora prompt --steps 500 --task trec

Each method trains from the same seed on the same capped, stratified split; the table gives the
trainable delta parameters as a share of the backbone, the best dev accuracy (early stopping on
dev), test accuracy, and the dev majority-class rate to beat.
"""

from __future__ import annotations

import argparse
import time

import torch

import adapters
from continual import TrainConfig, eval_loader, evaluate, majority_rate, train_task
from streams import SOURCES, load_task_data

# Small-model settings where the survey's T5-base defaults do not fit a 6-layer, 64-token model.
OVERRIDES = {"prompt": {"num_tokens": 20}, "selective": {"patterns": ["attention"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--task", default="movie", choices=sorted(SOURCES))
    p.add_argument("--backbone", default=adapters.DEFAULT_BACKBONE)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data, src = load_task_data(args.task, seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    majority = majority_rate(data["dev"])
    model = adapters.DeltaModel.from_pretrained(args.backbone)
    test_loader = eval_loader(data["test"], model.tokenizer, args.max_length)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         eval_every=max(1, args.steps // 6), patience=None, seed=args.seed,
                         device=args.device, progress=False)
    print(f"task={args.task} backbone={args.backbone} steps={args.steps} batch={args.batch_size} "
          f"train={len(data['train'])} dev={len(data['dev'])} test={len(data['test'])} dev_majority={majority:.3f}")
    print(f"{'method':<12} {'delta params':>12} {'ratio %':>8} {'dev acc':>8} {'test acc':>8} {'test F1':>8} {'s':>6}")
    for method in args.methods or adapters.available_methods():
        torch.manual_seed(args.seed)
        model.add_task(method, [{"method": method, **OVERRIDES.get(method, {})}], label_names=src.label_names)
        t0 = time.perf_counter()
        result = train_task(model, method, data, config)
        test = evaluate(model, method, test_loader)
        r = model.parameter_report(method)
        print(f"{method:<12} {r['delta_params']:>12,} {100 * r['delta_ratio']:>8.3f} {result.best_dev['accuracy']:>8.3f} "
              f"{test['accuracy']:>8.3f} {test['macro_f1']:>8.3f} {time.perf_counter() - t0:>6.0f}", flush=True)
        model.remove_task(method)


if __name__ == "__main__":
    main()
