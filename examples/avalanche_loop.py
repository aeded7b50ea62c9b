"""Export one of our streams as an Avalanche benchmark and train on it with Avalanche's own loop,
evaluation and metrics (needs the [avalanche] extra: bash scripts/install.sh --avalanche).

    python examples/avalanche_loop.py --strategy LwF --max-train 200 --epochs 1

`continual run --strategy avalanche-lwf` is the scored, resumable, MLflow-logged way to run the same
strategies; this example shows the pieces for people who want to stay in Avalanche:
``continual.strategies.avalanche.avalanche_benchmark`` (train/valid/test streams, one experience per
task, task label = task index) and ``continual.strategies.avalanche.model.AvalancheNet`` (the backbone with one
head per task, as an Avalanche multi-task module).
"""

from __future__ import annotations

import argparse

import adapters  # noqa: F401  first: makes a CPU-only torchvision importable (adapters/torchvision_compat.py)
import torch

from continual.strategies.avalanche import avalanche_benchmark, require_avalanche
from streams import load_stream

STRATEGIES = ("Naive", "EWC", "LwF", "Replay", "AGEM")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", default="default", help="a built-in stream or a YAML file")
    p.add_argument("--strategy", default="LwF", choices=STRATEGIES)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no Avalanche log output")
    args = p.parse_args(argv)
    require_avalanche()
    import avalanche.training.supervised as supervised
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.logging import InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    from adapters import DeltaModel
    from continual.strategies.avalanche import AVALANCHE_STRATEGIES
    from continual.strategies.avalanche.model import AvalancheNet

    stream = load_stream(args.stream, args.seed, args.max_train or None, args.max_eval or None)
    torch.manual_seed(args.seed)
    model = DeltaModel.from_pretrained(args.backbone)
    for task in stream:  # one head per task; the backbone trains too (as Avalanche's baselines do)
        model.add_task(task.name, [], label_names=task.label_names)
    bench = avalanche_benchmark(stream, model.tokenizer, args.max_length)
    net = AvalancheNet(model.backbone)
    net.sync(model)
    for param in net.parameters():
        param.requires_grad_(True)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
                                 loggers=[] if args.quiet else [InteractiveLogger()])
    options = {s.avalanche_class: s.defaults for s in AVALANCHE_STRATEGIES}[args.strategy]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = getattr(supervised, args.strategy)(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=args.lr), criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=args.batch_size * 2, device=device,
        evaluator=evaluator, **options)
    metrics: dict = {}
    for exp in bench.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[: exp.current_experience + 1])
    accuracy = {k: v for k, v in metrics.items() if k.startswith("Top1_Acc_Exp")}
    print(f"\n{args.strategy} on {stream.name}: Avalanche's final per-task test accuracy")
    for k, v in sorted(accuracy.items()):
        print(f"  {k}: {v:.3f}")
    return {"tasks": stream.names, "metrics": metrics, "experiences": len(bench.train_stream)}


if __name__ == "__main__":
    main()
