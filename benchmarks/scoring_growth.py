"""How scoring grows along a long stream: the seconds spent scoring each row of the accuracy matrix,
with scores of unchanged old tasks carried over (the default) and with every entry re-scored
(``--rescore-all``), on a 20-task stream of built-in and YAML (CSV file) tasks.

    python3 benchmarks/scoring_growth.py [--tasks 20] [--max-eval 100] [--steps 5]

Target (issue "the main job twice as fast..."): with carry-over the last row costs at most 2x the
first. Prints both modes' first/last row times and checks that the two matrices are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from continual import TrainConfig, make_strategy, run_stream
from streams import SOURCES, builtin_task, load_stream


def make_stream(directory: Path, n: int, max_train: int, max_eval: int, seed: int) -> Path:
    """``n`` tasks: built-in sources by name (``source:``) and, every other one, the same data
    written to a CSV file (a YAML file task), cycling over the catalogue."""
    tasks = []
    for i in range(n):
        src = list(SOURCES)[i % len(SOURCES)]
        name = f"t{i:02d}-{src}"
        if i % 2:
            t = builtin_task(src, seed + i, max_train, max_eval)
            for split in ("train", "dev", "test"):
                ds = getattr(t, split)
                ds.to_pandas().assign(label=[t.label_names[y] for y in ds["label"]])[["text", "label"]].to_csv(
                    directory / f"{name}-{split}.csv", index=False)
            tasks.append({"name": name, "train": f"{name}-train.csv", "dev": f"{name}-dev.csv",
                          "test": f"{name}-test.csv", "label_names": t.label_names})
        else:
            tasks.append({"name": name, "source": src, "max_train": max_train, "max_eval": max_eval})
    path = directory / "long.yaml"
    path.write_text(yaml.safe_dump({"name": f"long{n}", "seed": seed, "tasks": tasks}, sort_keys=False))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--max-train", type=int, default=64)
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--method", default="lora")
    args = p.parse_args()
    from adapters import DeltaModel

    work = Path(tempfile.mkdtemp(prefix="scoring-"))
    stream = load_stream(make_stream(work, args.tasks, args.max_train, args.max_eval, 0))
    config = TrainConfig(max_steps=args.steps, eval_every=args.steps, batch_size=16, max_length=64, progress=False)
    rows = {}
    for mode, rescore_all in (("carried over", False), ("re-scored", True)):
        torch.manual_seed(0)
        model = DeltaModel.from_pretrained(args.backbone)
        start = time.perf_counter()
        res = run_stream(stream, model, make_strategy("per-task", [args.method]), config, work / mode.replace(" ", "-"),
                         rescore_all=rescore_all)
        times = [s["scoring_seconds"] for s in res.steps]
        rows[mode] = (res, times, time.perf_counter() - start)
        print(f"{mode}: scoring of row 1 {times[0]:.2f} s, row {len(times)} {times[-1]:.2f} s "
              f"(x{times[-1] / times[0]:.2f}); all scoring {sum(times):.1f} s; run {rows[mode][2]:.0f} s", flush=True)
    same = np.array_equal(rows["carried over"][0].matrix.R, rows["re-scored"][0].matrix.R, equal_nan=True)
    print(f"\n{args.tasks} tasks ({sum('source' not in t for t in yaml.safe_load((work / 'long.yaml').read_text())['tasks'])} "
          f"from CSV files), {args.max_eval} test examples each, {args.backbone}, {args.method}")
    print("| mode | row 1 scoring | last row scoring | last / first | all scoring | whole run |")
    print("|---|---|---|---|---|---|")
    for mode, (_, t, total) in rows.items():
        print(f"| {mode} | {t[0]:.2f} s | {t[-1]:.2f} s | {t[-1] / t[0]:.2f}x | {sum(t):.1f} s | {total:.0f} s |")
    print(f"\nmatrices identical: {same}")


if __name__ == "__main__":
    main()
