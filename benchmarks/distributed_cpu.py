"""Data parallelism and study workers on this machine's CPUs, against one process, same run.

    python3 benchmarks/distributed_cpu.py [--procs 2] [--backbone minilm] [--max-train 256] [--steps 60]

1. A 3-task stream (movie -> trec -> sms, built-in data) run by ``continual run`` in one process
   and by ``torchrun --nproc_per_node N -m continual run`` (gloo), fp32 with dropout off (the
   deterministic forward the equality needs): wall times, the two accuracy matrices (must be
   equal), the largest difference of any trained weight, and the files rank 0 wrote.
2. ``continual compare`` (2 entries x 2 seeds) with ``--workers N`` against ``--workers 1``:
   wall times and whether every number of the two reports is identical.

Prints a Markdown report (``--out FILE`` also writes it). Each step runs alone, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file


def sh(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def matrix_rows(path: Path) -> list[str]:
    m = json.loads((path / "results.json").read_text())["matrix"]
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    return ["| " + " | ".join(["after " + m["tasks"][i]] + [fmt(v) for v in row]) + " |" for i, row in enumerate(m["R"])]


def weight_gap(a: Path, b: Path) -> float:
    gaps = [0.0]
    for f in sorted(a.glob("checkpoints/*/*/*.safetensors")):
        x, y = load_file(f), load_file(b / f.relative_to(a))
        gaps += [float((x[k] - y[k]).abs().max()) for k in x]
    return max(gaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--max-train", type=int, default=256)
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compare-steps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    stream = tmp / "three.yaml"
    stream.write_text(yaml.safe_dump({"name": "three", "tasks": [{"name": s, "source": s} for s in ("movie", "trec", "sms")]}))
    run = ["-m", "continual", "run", "--stream", str(stream), "--backbone", args.backbone, "--method", "lora",
           "--max-train", str(args.max_train), "--max-eval", str(args.max_eval), "--steps", str(args.steps),
           "--eval-every", "30", "--batch-size", "16", "--max-length", "64", "--precision", "fp32", "--no-dropout",
           "--no-progress", "--no-mlflow"]
    one = sh([sys.executable, *run, "--out", str(tmp / "one")])
    n = args.procs
    many = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *run,
               "--out", str(tmp / "many")], {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))})
    a, b = (json.loads((tmp / d / "results.json").read_text()) for d in ("one", "many"))
    equal = all(np.array_equal(np.array(a["matrix"][k], dtype=float), np.array(b["matrix"][k], dtype=float), equal_nan=True)
                for k in ("R", "F1", "b", "b_f1"))
    files = sorted(str(f.relative_to(tmp / "many")) for f in (tmp / "many").rglob("*") if f.is_file())
    same_files = files == sorted(str(f.relative_to(tmp / "one")) for f in (tmp / "one").rglob("*") if f.is_file())
    tasks = a["matrix"]["tasks"]
    lines = [f"# Data parallelism on CPU ({os.cpu_count()} cores, torch {torch.__version__})", "",
             f"Stream movie -> trec -> sms, backbone {args.backbone}, LoRA per task, caps {args.max_train} train / "
             f"{args.max_eval} dev / {args.max_eval} test, {args.steps} steps of global batch 16, fp32, --no-dropout.", "",
             "| | wall time | ACC | BWT |", "|---|---|---|---|",
             f"| 1 process (`continual run`) | {one:.1f} s | {a['metrics']['ACC']:.4f} | {a['metrics']['BWT']:+.4f} |",
             f"| {n} processes (`torchrun --nproc_per_node {n}`, gloo) | {many:.1f} s | {b['metrics']['ACC']:.4f} | "
             f"{b['metrics']['BWT']:+.4f} |", "",
             f"Matrices (accuracy, macro-F1, untrained b) identical: **{equal}**; largest difference of a trained "
             f"weight: {weight_gap(tmp / 'one', tmp / 'many'):.2e}; rank 0 wrote the same files as one process: "
             f"**{same_files}**.", "", "1 process | " + " | ".join(tasks), "|---" * (len(tasks) + 1) + "|",
             *matrix_rows(tmp / "one"), "", f"{n} processes | " + " | ".join(tasks), "|---" * (len(tasks) + 1) + "|",
             *matrix_rows(tmp / "many"), "", f"Files rank 0 wrote ({len(files)}): " + ", ".join(f"`{f}`" for f in files), ""]
    cmp = ["-m", "continual", "compare", "--stream", str(stream), "--backbone", args.backbone,
           "--entry", "per-task:lora", "--entry", "seq-delta:lora", "--seeds", "0,1", "--max-train", str(args.max_train),
           "--max-eval", str(args.max_eval), "--steps", str(args.compare_steps), "--eval-every", "30", "--batch-size", "16",
           "--max-length", "64", "--no-progress", "--no-mlflow"]
    w1 = sh([sys.executable, *cmp, "--out", str(tmp / "w1")])
    wn = sh([sys.executable, *cmp, "--workers", str(n), "--out", str(tmp / "wn")])
    r1, rn = (json.loads((tmp / d / "report.json").read_text())["rows"] for d in ("w1", "wn"))
    keys = ("ACC", "BWT", "FWT", "forgetting", "ACC_std", "BWT_std", "trainable_params_per_task")
    same = all(r1[e][k] == rn[e][k] for e in r1 for k in keys)
    lines += [f"## `continual compare`: 2 entries x 2 seeds = 4 runs ({args.compare_steps} steps per task, fp32: compare has no --precision; dropout on, fast masks)", "",
              "| pool | wall time |", "|---|---|", f"| `--workers 1` | {w1:.1f} s |", f"| `--workers {n}` | {wn:.1f} s |", "",
              f"Every number of the two reports ({', '.join(keys)}) identical: **{same}**.", "",
              "| entry | ACC (workers 1) | ACC (workers " + str(n) + ") | BWT (1) | BWT (" + str(n) + ") |", "|---|---|---|---|---|"]
    lines += [f"| {e} | {r1[e]['ACC']:.4f} ± {r1[e]['ACC_std']:.4f} | {rn[e]['ACC']:.4f} ± {rn[e]['ACC_std']:.4f} | "
              f"{r1[e]['BWT']:+.4f} | {rn[e]['BWT']:+.4f} |" for e in r1]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
