"""The real training loop under each ``torch.compile`` mode: does the CUDA-graph path hold?

    python3 benchmarks/compile_loop.py                                  # GPU: default stream, 2 tasks
    python3 benchmarks/compile_loop.py --stream .gpu/streams/generative/generative.yaml \\
        --backbone .gpu/smollm2 --random-init --modes none,reduce-overhead   # a decoder, random weights

``benchmarks/speed.py`` times one training step in isolation; this runs what a user runs:
:func:`~continual.scheduler.run_stream` with per-task LoRA (a fresh delta per task, so each task
traces again), length-bucketed batches (several shapes per task), dev scoring between steps,
best-on-dev weights copied back, and every task scored into R. Each mode runs in a fresh process
(no compiled code shared between modes) with the same seed, data and recipe
(``TrainConfig.fast``: bf16 on a GPU, buckets); only ``compile`` differs.

Printed per mode: the run's wall time, its training seconds (compilation included: each task
compiles its own graph), the training rate once compiled (the median samples/s of the log
windows after each task's first), ACC, how far its R and dev histories are from the uncompiled
run's (bf16 kernels fused differently round differently, so not bit for bit), dynamo's graph and
recompile counts, inductor's CUDA-graph skips (a skip means that mode silently ran without CUDA
graphs), and peak GPU memory. Absolute numbers move between machines: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stream once under ``args.child`` (a compile mode or ``none``); what it measured."""
    import torch

    import adapters
    from continual.scheduler import run_stream
    from continual.strategies import make_strategy
    from continual.training import TrainConfig
    from streams import load_stream

    mode = None if args.child == "none" else args.child
    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.backbone
        if args.random_init:
            from decode_speed import random_backbone

            backbone = random_backbone(backbone, Path(tmp) / "backbone")
        model = adapters.DeltaModel.from_pretrained(backbone, dtype=torch.float32)
        stream = load_stream(args.stream, seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
        config = TrainConfig.fast(compile=mode, max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                                  eval_every=args.eval_every, log_every=args.log_every, seed=args.seed, progress=False,
                                  device=args.device, patience=None)
        start = time.perf_counter()
        result = run_stream(stream, model, make_strategy("per-task", [args.method]), config, Path(tmp) / "run")
        wall = time.perf_counter() - start
    from torch._dynamo.utils import counters

    rates = [r["samples_per_s"] for s in result.steps for r in s["history"][1:]]
    cuda = torch.cuda.is_available() and config.torch_device().type == "cuda"
    return {
        "mode": args.child, "wall_s": wall, "train_s": sum(s["train_seconds"] for s in result.steps),
        "first_task_train_s": result.steps[0]["train_seconds"],
        "steady_samples_per_s": statistics.median(rates) if rates else None,
        "acc": result.metrics["ACC"], "R": [[float(x) for x in row] for row in result.matrix.R],
        "history": [[(r["step"], r["loss"], r.get("dev_accuracy")) for r in s["history"]] for s in result.steps],
        "counters": {k: {str(kk): vv for kk, vv in v.items()} for k, v in counters.items()},
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
    }


def differences(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """How far ``run``'s numbers are from the reference run's: R entries, dev scores and mean losses
    at the same steps (NaN, where R has no entry, counts as equal when both lack it)."""
    def gap(a: float | None, b: float | None) -> float:
        if a is None or b is None or a != a or b != b:
            return 0.0 if (a is None or a != a) == (b is None or b != b) else float("inf")
        return abs(a - b)

    r = max((gap(a, b) for ra, rb in zip(run["R"], ref["R"]) for a, b in zip(ra, rb)), default=0.0)
    pairs = [(x, y) for ha, hb in zip(run["history"], ref["history"]) for x, y in zip(ha, hb)]
    dev = max((gap(x[2], y[2]) for x, y in pairs), default=0.0)
    loss = max((abs(x[1] - y[1]) / max(abs(y[1]), 1e-8) for x, y in pairs), default=0.0)
    return {"R": r, "dev": dev, "loss_rel": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default="default", help="a built-in stream or a stream YAML (default: default)")
    ap.add_argument("--tasks", type=int, default=2, help="the stream's first N tasks (built-in streams)")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--random-init", action="store_true", help="the backbone's config with random weights (see decode_speed.py)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--modes", default="none,default,reduce-overhead", help="compile modes; none: not compiled")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--max-train", type=int, default=256)
    ap.add_argument("--max-eval", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds each mode may take before it is stopped")
    ap.add_argument("--json", default=None, help="write every mode's measurements here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.stream in ("default", "generative") and args.tasks:
        args.stream = first_tasks(args.stream, args.tasks, args.max_train, args.max_eval)
    runs, argv = [], [a for a in sys.argv[1:]]
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *argv, "--stream", args.stream, "--child", mode]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: stopped after {args.timeout:.0f} s", flush=True)
            continue
        if done.returncode != 0:
            print(f"{mode}: failed (exit {done.returncode}) after {time.perf_counter() - start:.0f} s\n{done.stderr[-3000:]}", flush=True)
            continue
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode}: done in {time.perf_counter() - start:.0f} s (process included)", flush=True)
        if args.json:  # after each mode: a run stopped later keeps what it measured
            Path(args.json).write_text(json.dumps(runs, indent=1))
    table(runs)


def first_tasks(name: str, n: int, max_train: int | None, max_eval: int | None) -> str:
    """A built-in stream cut to its first ``n`` tasks, as a stream name the child can load: the
    stream YAML that ``benchmarks/gpu_pack.py`` writes, in a temporary folder."""
    from gpu_pack import stream

    folder = Path(tempfile.mkdtemp(prefix="compile-loop-"))
    stream(name, n, max_train, max_eval, folder)
    return str(folder / f"{name}.yaml")


def table(runs: list[dict[str, Any]]) -> None:
    if not runs:
        return
    ref = runs[0]
    print(f"\ndevice {ref['device']}, torch {ref['torch']}; differences against mode {ref['mode']!r}\n")
    print("| mode | wall s | train s (1st task) | samples/s compiled | ACC | max abs dR | max abs d dev | max rel d loss "
          "| graphs | recompiles | cudagraph skips | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        d = differences(run, ref)
        c = run["counters"]
        skips = sum(c.get("inductor", {}).get(k, 0) for k in c.get("inductor", {}) if "cudagraph_skip" in k)
        rate = f"{run['steady_samples_per_s']:.0f}" if run["steady_samples_per_s"] else ""
        peak = f"{run['peak_gb']:.2f}" if run["peak_gb"] is not None else ""
        print(f"| {run['mode']} | {run['wall_s']:.1f} | {run['train_s']:.1f} ({run['first_task_train_s']:.1f}) | {rate} "
              f"| {run['acc']:.4f} | {d['R']:.4f} | {d['dev']:.4f} | {d['loss_rel']:.4f} "
              f"| {c.get('stats', {}).get('unique_graphs', 0)} | {c.get('recompiles', {}) and sum(c['recompiles'].values())} "
              f"| {skips} | {peak} |")


if __name__ == "__main__":
    main()
