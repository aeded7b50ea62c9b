"""Every strategy for a few steps on the device at hand: do their own tensors follow the model there?

    python3 benchmarks/strategies_device.py                                   # here: default stream, MiniLM
    python3 benchmarks/strategies_device.py --stream .gpu/streams/default/default.yaml --backbone .gpu/minilm
                                                                              # on the GPU machine (gpu_check.sh)
    python3 benchmarks/strategies_device.py --stream .gpu/streams/generative/generative.yaml \
        --backbone .gpu/smollm2 --random-init                                  # there, generative (lamol's)

The unit tests run every strategy on a CPU, where a tensor a strategy builds on its own (a memory,
a basis, a merge's weights) is on the model's device by accident. On a GPU such a tensor meets the
model's CUDA tensors and fails, or is silently copied back and forth each step. This runs each
strategy (the Avalanche ones where that extra is installed) over the stream's first tasks with a
few steps on ``--device`` (default: a GPU where there is one) and prints one row each: its ACC
with and without the task id, its seconds and peak GPU memory, or the error it stopped with. The
exit code is the number of strategies that failed (a check, not a benchmark of accuracy: a few
steps say nothing of how well a method does). A strategy that refuses the stream's kind of task by
design (Avalanche's on generative tasks, ``lamol`` on classification) is listed as skipped: run a
generative stream on a decoder for those (``--random-init`` builds a backbone whose weights are not
carried, as ``decode_speed.py`` does: the same shapes and code paths, answers that mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_speed's random_backbone


def run_one(name: str, stream, backbone: str, config, out: Path) -> str:
    """One strategy's row: ACC, ACC without the task id, seconds, peak GPU memory."""
    import torch

    import adapters
    from continual.scheduler import run_stream
    from continual.strategies import make_strategy

    model = adapters.DeltaModel.from_pretrained(backbone, dtype=torch.float32)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own lines: one row per strategy is printed instead
        res = run_stream(stream, model, make_strategy(name), config, out)
    seconds = time.perf_counter() - start
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "-"
    agnostic = res.metrics.get("ACC_agnostic", float("nan"))
    return f"{res.metrics['ACC']:.4f} | {agnostic:.4f} | {seconds:.1f} | {peak}"


def main() -> int:
    import torch

    from continual.strategies import STRATEGIES
    from continual.training import TrainConfig
    from streams import load_stream

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", default="default", help="a built-in stream or a stream YAML (default: default)")
    p.add_argument("--backbone", default="minilm", help="minilm, a local path, ... (default: minilm)")
    p.add_argument("--tasks", type=int, default=2, help="the stream's first tasks to run (default: 2)")
    p.add_argument("--steps", type=int, default=6, help="training steps per task (default: 6)")
    p.add_argument("--device", default=None, help="default: a GPU where there is one, else the CPU")
    p.add_argument("--only", default=None, help="comma-separated strategies (default: all)")
    p.add_argument("--random-init", action="store_true", help="the backbone's config with random weights (see decode_speed.py)")
    args = p.parse_args()
    kept = tempfile.TemporaryDirectory()  # a random backbone's files, removed when the checks end
    if args.random_init:
        from decode_speed import random_backbone

        args.backbone = random_backbone(args.backbone, Path(kept.name) / "backbone")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stream = load_stream(args.stream, seed=0, max_train=32, max_eval=16)
    stream = type(stream)(stream.name, stream.tasks[:args.tasks])
    config = TrainConfig(max_steps=args.steps, eval_every=max(1, args.steps // 2), batch_size=8, max_length=48,
                         progress=False, device=device, patience=None)
    names = args.only.split(",") if args.only else list(STRATEGIES)
    print(f"{len(names)} strategies on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"stream {stream.name} ({', '.join(stream.names)}), {args.steps} steps per task\n")
    print("| strategy | ACC | ACC, no task id | seconds | peak GPU memory |\n|---|---|---|---|---|")
    failed = 0
    kinds = {t.generative for t in stream}
    for name in names:
        if (True in kinds and not STRATEGIES[name].generative_tasks) or \
                (False in kinds and not STRATEGIES[name].classification_tasks):
            print(f"| {name} | skipped: it refuses this stream's kind of task by design | | | |", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = run_one(name, stream, args.backbone, config, Path(tmp) / name)
            except ImportError as e:  # an optional extra (avalanche) not installed: not a device failure
                row = f"skipped: {e} | | |"
            except Exception as e:  # every failure is reported, and the next strategy still runs
                failed += 1
                row = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | |"
                traceback.print_exc(file=sys.stderr)
        print(f"| {name} | {row} |", flush=True)
    print(f"\n{failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
