"""Every fault and bad input of the trust issue, tried through the real ``continual`` command line:
what the user sees (first line), the exit code, the seconds it took, and whether finished work was
lost (a resumed or guarded run must end with the uninterrupted run's matrix; a refused command
must leave the run directory as it was).

    python3 benchmarks/fault_table.py [--backbone DIR] [--out benchmarks/results/faults-cpu.md]

By default a tiny random-init BERT with the real MiniLM tokenizer (64 positions), so the table
takes minutes: the faults are the tool's, not the model's. A real ``mlflow server`` on 127.0.0.1
is started and stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port, stop_mlflow_server  # noqa: E402  (the tests' helpers)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "apple river green music table window cloud stone paper light dream voice fire ocean".split()


def cli(*args: str, wait_for=None, timeout: int = 600) -> dict:
    """Run ``python -m continual ARGS``; ``wait_for(proc)`` may act while it runs."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "continual", *args], cwd=WORK, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if wait_for is not None:
        wait_for(proc)
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in err.splitlines() if ln.startswith(("continual", "warning"))] or \
            [ln for ln in out.splitlines() if "MLflow" in ln or "logged to" in ln] or [""]
    return {"rc": proc.returncode, "first": lines[0].strip(), "seconds": time.perf_counter() - start}


def toy_stream(directory: Path) -> Path:
    import random

    tasks = []
    for name, key, seed in (("a", "apple", 1), ("b", "river", 2), ("c", "music", 3)):
        rng = random.Random(seed)
        rows = []
        for i in range(160):
            words = [w for w in rng.choices(WORDS, k=6) if w != key]
            if i % 2:
                words[rng.randrange(len(words))] = key
            rows.append(f"{' '.join(words)},{'yes' if i % 2 else 'no'}")
        (directory / f"{name}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
        tasks.append({"name": name, "train": f"{name}.csv"})
    (directory / "toy.yaml").write_text(yaml.safe_dump({"name": "toy", "tasks": tasks}))
    return directory / "toy.yaml"


def tiny_backbone(directory: Path) -> Path:
    from conftest import tiny_text_backbone
    from transformers import AutoTokenizer

    from adapters.backbones import _minilm

    tok = AutoTokenizer.from_pretrained(str(_minilm()))
    tiny_text_backbone(tok.vocab_size).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def run_args(out: Path, *extra: str) -> list[str]:
    return ["run", "--stream", str(STREAM), "--backbone", str(BACKBONE), "--method", "lora:rank=4", "--steps", "40",
            "--eval-every", "20", "--max-length", "16", "--lr", "1e-2", "--head-lr", "1e-2", "--no-progress",
            "--out", str(out), *extra]


def matrix(out: Path) -> list:
    return json.loads((out / "results.json").read_text())["matrix"]["R"]


def killed_copy(name: str) -> Path:
    dest = WORK / name
    shutil.copytree(KILLED, dest)
    return dest


def kill_when_done(out: Path, done: list[int], sig=signal.SIGKILL):
    def act(proc):
        while proc.poll() is None:
            state = out / "state.json"
            try:
                if state.exists() and json.loads(state.read_text() or "{}").get("done") == done:
                    time.sleep(1.0)  # into the next task's training
                    proc.send_signal(sig)
                    return
            except json.JSONDecodeError:
                pass
            time.sleep(0.2)
    return act


def mlflow_server() -> tuple[subprocess.Popen, str]:
    from conftest import start_mlflow_server

    return start_mlflow_server(WORK, "server")


def scenarios() -> list[tuple[str, dict, str]]:
    rows = []

    def add(name, result, lost):
        rows.append((name, result, lost))
        print(f"{name}: rc={result['rc']} {result['first'][:100]!r} lost={lost}", flush=True)

    # kills
    out = WORK / "kill9"
    r = cli(*run_args(out, "--no-mlflow"), wait_for=kill_when_done(out, [0]))
    r2 = cli(*run_args(out, "--no-mlflow", "--resume"))
    add("SIGKILL during task 2's training, then --resume", {**r2, "first": f"(kill: rc {r['rc']}) " + r2["first"]},
        "none" if matrix(out) == REFERENCE else "MATRIX DIFFERS")
    # damaged files
    for name, damage in (("state tensors: 8 bytes flipped mid-file", lambda d: flip(next(d.glob("state-step*")), 0.5)),
                         ("state tensors: header damaged", lambda d: flip(next(d.glob("state-step*")), 0.0)),
                         ("state tensors: truncated", lambda d: truncate(next(d.glob("state-step*")))),
                         ("state.json holds []", lambda d: (d / "state.json").write_text("[]")),
                         ('state.json holds {"version": 2}', lambda d: (d / "state.json").write_text('{"version": 2}')),
                         ("state.json: one matrix entry edited (valid JSON)", edit_state)):
        d = killed_copy("damage-" + str(len(rows)))
        damage(d)
        before = snapshot(d)
        add(f"{name}, then --resume", cli(*run_args(d, "--no-mlflow", "--resume")), "none" if snapshot(d) == before else "FILES CHANGED")
    res = json.loads((FULL / "results.json").read_text())
    res["metrics"]["ACC"] = 0.99
    d = WORK / "edited-results"
    shutil.copytree(FULL, d)
    (d / "results.json").write_text(json.dumps(res))
    add("results.json: ACC edited, then `report`", cli("report", str(d)), "none")
    d = WORK / "damaged-ckpt"
    shutil.copytree(FULL, d)
    flip(d / "checkpoints" / "b" / "b" / "delta.safetensors", 0.6)
    add("a checkpoint damaged, then `transfer`", cli("transfer", str(d), "--backbone", str(BACKBONE)), "none")
    # tracking
    add("tracking port closed at start", cli(*run_args(WORK / "closed", "--tracking-uri", f"http://127.0.0.1:{free_port()}")),
        lost_vs_reference(WORK / "closed"))
    server, url = mlflow_server()
    try:
        out = WORK / "server-killed"
        r = cli(*run_args(out, "--tracking-uri", url), wait_for=stop_server_when_done(out, server))
        add("mlflow server stopped (by pid) after task 1", r, lost_vs_reference(out))
        add("... then `continual sync` to a new store", cli("sync", str(out), "--tracking-uri", f"sqlite:///{WORK}/later.db"), "none")
    finally:
        stop_mlflow_server(server)
    procs = [subprocess.Popen([sys.executable, "-m", "continual", *run_args(WORK / f"race{i}", "--tracking-uri",
                               f"sqlite:///{WORK}/race.db")], cwd=WORK, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    start = time.perf_counter()
    errs = [p.communicate()[1] for p in procs]
    add("two runs started together on a new SQLite store", {"rc": max(p.returncode for p in procs), "seconds": time.perf_counter() - start,
        "first": "(both finished)" if all(p.returncode == 0 for p in procs) else errs[0].splitlines()[-1]},
        "none" if all(matrix(WORK / f"race{i}") == REFERENCE for i in range(2)) else "MATRIX DIFFERS")
    add("--tracking-uri sqlite:///", cli(*run_args(WORK / "mem", "--tracking-uri", "sqlite:///")), "none (nothing started)")
    # settings
    for extra in (["--lr", "nan"], ["--lr", "-1"], ["--eval-every", "0"], ["--max-length", "0"], ["--max-length", "100000"],
                  ["--method", "prompt:num_tokens=60"]):
        args = run_args(WORK / "bad", "--no-mlflow")
        add(" ".join(extra), cli(*(args + extra)), "none (nothing started)")
    d = WORK / "overwrite"
    shutil.copytree(FULL, d)
    before = snapshot(d)
    add("--overwrite --device cuda (no GPU here)", cli(*run_args(d, "--no-mlflow", "--overwrite", "--device", "cuda")),
        "none" if snapshot(d) == before else "FILES CHANGED")
    # bad input files
    for name, make in bad_streams().items():
        add(name, cli("run", "--stream", str(make), "--backbone", str(BACKBONE), "--no-mlflow", "--out", str(WORK / "x")),
            "none (nothing started)")
    return rows


def bad_streams() -> dict[str, Path]:
    d = WORK / "bad-streams"
    d.mkdir()
    bomb = "name: x\nl0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        bomb += f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    (d / "bomb.yaml").write_text(bomb + "tasks: [{name: a, source: movie, label_names: *a8}]\n")
    (d / "a.csv").write_text("text,label\nhello,pos\nworld,NaN\nfoo,neg\n")
    (d / "nan.yaml").write_text(yaml.safe_dump({"name": "x", "tasks": [{"name": "a", "train": "a.csv"}]}))
    (d / "list.yaml").write_text(yaml.safe_dump({"name": "x", "tasks": [{"name": ["a", "b"], "source": "movie"}]}))
    (d / "badname.yaml").write_text(yaml.safe_dump({"name": "x", "tasks": [{"name": "a/b", "source": "movie"}]}))
    os.symlink(d / "loop2.yaml", d / "loop1.yaml")
    os.symlink(d / "loop1.yaml", d / "loop2.yaml")
    return {f"YAML alias bomb ({(d / 'bomb.yaml').stat().st_size} bytes)": d / "bomb.yaml",
            "the string NaN in a label column": d / "nan.yaml", "a task name given as a YAML list": d / "list.yaml",
            "an invalid task name (a/b)": d / "badname.yaml", "a symlink loop as the stream file": d / "loop1.yaml"}


def stop_server_when_done(out: Path, server: subprocess.Popen):
    def act(proc):
        while proc.poll() is None:
            try:
                if json.loads((out / "state.json").read_text() or "{}").get("done") == [0]:
                    time.sleep(2.0)  # task 1's logging done
                    server.send_signal(signal.SIGTERM)
                    server.wait(timeout=30)
                    return
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
    return act


def flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    for i in range(at, at + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_state(d: Path) -> None:
    state = json.loads((d / "state.json").read_text())
    state["matrix"]["R"][0][0] = 0.123
    (d / "state.json").write_text(json.dumps(state))


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def lost_vs_reference(out: Path) -> str:
    return "none" if (out / "results.json").exists() and matrix(out) == REFERENCE else "MATRIX DIFFERS OR MISSING"


def main() -> None:
    global WORK, STREAM, BACKBONE, REFERENCE, KILLED, FULL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="backbone directory (default: a tiny random-init BERT)")
    p.add_argument("--out", default=None, help="write the Markdown table here too")
    args = p.parse_args()
    WORK = Path(tempfile.mkdtemp(prefix="faults-"))
    STREAM = toy_stream(WORK)
    BACKBONE = Path(args.backbone) if args.backbone else tiny_backbone(WORK / "tiny-bert")
    FULL = WORK / "full"
    cli(*run_args(FULL, "--no-mlflow"))
    REFERENCE = matrix(FULL)
    KILLED = WORK / "killed"
    cli(*run_args(KILLED, "--no-mlflow"), wait_for=kill_when_done(KILLED, [0, 1]))
    rows = scenarios()
    lines = ["| fault or bad input | what the user sees (first line) | exit | seconds | finished work lost |",
             "|---|---|---|---|---|"]
    for name, r, lost in rows:
        lines.append(f"| {name} | `{r['first'][:160].replace('|', '/')}` | {r['rc']} | {r['seconds']:.0f} | {lost} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(f"# Faults and bad input (`python3 benchmarks/fault_table.py`)\n\n{table}\n")
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
