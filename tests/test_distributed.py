"""Data parallelism on torch.distributed: real ``torchrun`` launches of 2 gloo processes on this CPU.

The spec: with dropout off (``--no-dropout``, a deterministic forward) and fp32, an N-process run
gives the accuracy matrix of a 1-process run with the same global batch, its trained deltas equal
up to float rounding (different GEMM shapes, an all-reduce adding two partial gradients); only rank
0 writes; a 2-process run killed mid-task resumes to the uninterrupted matrix.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from continual.cli import main
from test_cli import toy_yaml  # noqa: F401  (a fixture)
from test_generative import toy_generative_yaml

# Rounding bound on the trained weights: measured ~5e-7 on these runs (fp32); 1e-5 leaves room for
# other CPUs' kernels while still failing on any real difference (a wrong loss scale is ~1e-2).
WEIGHT_ATOL = 1e-5


def opts(stream, backbone, out, *extra, steps: int = 60):
    return ["run", "--stream", str(stream), "--backbone", str(backbone), "--method", "lora:rank=4", "--steps", str(steps),
            "--eval-every", "20", "--max-length", "16", "--lr", "1e-2", "--head-lr", "1e-2", "--batch-size", "16",
            "--precision", "fp32", "--no-dropout", "--no-progress", "--no-mlflow", "--out", str(out), *extra]


def torchrun(args, n: int = 2, background: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "continual", *args]
    return launch(cmd, wait=not background)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts each worker in a session of
    its own, so killing the launcher's process group leaves the workers running (orphans that go on
    writing the run directory); they are found through /proc and killed, and waited for."""
    def children(p: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == p:
                found.append(int(stat.parent.name))
        return found

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 60
    for p in tree[1:]:  # the launcher is the caller's child: its wait() reaps it
        while time.time() < deadline and Path(f"/proc/{p}").exists() and "State:\tZ" not in _status(p):
            time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def launch(cmd, wait: bool = True, timeout: int = 300):
    """Start the launcher in its own session, so that a hang (or the kill test) can stop every
    process it started; ``wait``: run to the end (killing all of them after ``timeout`` s)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... hung for {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_same_run(one: Path, two: Path) -> None:
    a, b = results(one), results(two)
    for key in ("R", "F1", "b", "b_f1"):
        np.testing.assert_array_equal(np.array(a["matrix"][key], dtype=float), np.array(b["matrix"][key], dtype=float), key)
    for fa in sorted(one.glob("checkpoints/*/*/*.safetensors")):
        ta, tb = load_file(fa), load_file(two / fa.relative_to(one))
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{fa.name}:{k}")


@pytest.mark.parametrize("strategy,sharded", [("per-task", False), pytest.param("joint", False, marks=pytest.mark.slow),
                                              pytest.param("magmax", False, marks=pytest.mark.slow), ("per-task", True)],
                         ids=["per-task", "joint", "magmax", "per-task-sharded-backbone"])
def test_two_processes_give_the_one_process_matrix(toy_yaml, tiny_backbone_dir, tmp_path, strategy, sharded):  # noqa: F811
    """``sharded``: the backbone's blocks sharded across the 2 processes (FSDP2), deltas under DDP."""
    extra = ["--strategy", strategy]
    assert main(opts(toy_yaml, tiny_backbone_dir, tmp_path / "one", *extra)) == 0
    proc = torchrun(opts(toy_yaml, tiny_backbone_dir, tmp_path / "two", *extra, *(["--shard-backbone"] if sharded else [])))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes (gloo)" in proc.stdout and proc.stdout.count("accuracy matrix R[i, j]") == 1  # rank 0 prints
    if sharded:  # each process holds half of the blocks' weights
        mine, total = (int(x.replace(",", "")) for x in re.search(r"each holds ([\d,]+) of their ([\d,]+)", proc.stdout).groups())
        assert total > 0 and abs(mine - total / 2) <= 0.01 * total
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # rank 0 alone wrote: the same files as one process, and the state records both steps' records
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "one") == files(tmp_path / "two")


@pytest.mark.slow  # torchrun's launch of the same training is in the default suite
def test_accelerate_launch_runs_the_same_data_parallel_training(toy_yaml, tiny_backbone_dir, tmp_path):  # noqa: F811
    """``accelerate launch`` (its torchrun launcher: --multi_gpu, which on a CPU means processes
    with gloo) sets the same environment; the run is the 1-process run."""
    pytest.importorskip("accelerate")
    assert main(opts(toy_yaml, tiny_backbone_dir, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "continual", *opts(toy_yaml, tiny_backbone_dir, tmp_path / "two")]
    proc = launch(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes (gloo)" in proc.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # (the sharded backbone is in the default suite by the per-task runs)
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded-backbone"])
def test_two_processes_on_a_generative_stream(tiny_lm_dir, tmp_path, sharded):
    """Token losses: the ranks' slices hold unequal numbers of answer tokens; generation split
    across the processes, or (sharded backbone) run in step on all of them."""
    stream = toy_generative_yaml(tmp_path)
    args = lambda out: [*opts(stream, tiny_lm_dir, out, steps=30)[:-2], "--max-length", "32", "--out", str(out)]  # noqa: E731
    assert main(args(tmp_path / "one")) == 0
    proc = torchrun(args(tmp_path / "two") + (["--shard-backbone"] if sharded else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # about a minute; a killed one-process run is in the default suite (test_cli, test_runner)
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_matrix(toy_yaml, tiny_backbone_dir, tmp_path):  # noqa: F811
    args = lambda out, *e: opts(toy_yaml, tiny_backbone_dir, out, "--patience", "0", *e, steps=400)  # noqa: E731
    assert main(args(tmp_path / "one")) == 0
    out = tmp_path / "two"
    proc = torchrun(args(out), background=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill every process once task a is saved
        state = out / "state.json"  # written atomically: always whole
        if state.exists() and json.loads(state.read_text()).get("done") == [0]:
            kill_tree(proc.pid)  # the launcher and both workers (which hold the run's lock)
            break
        time.sleep(0.05)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, proc.communicate()
    assert not (out / "results.json").exists()
    again = torchrun(args(out, "--resume"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_run(tmp_path / "one", out)


def test_what_cannot_run_on_several_processes_is_refused(toy_yaml, tiny_backbone_dir, tmp_path, capsys):  # noqa: F811
    # sharding needs processes to shard across, and a frozen backbone: refused before anything is written
    assert main(opts(toy_yaml, tiny_backbone_dir, tmp_path / "s", "--shard-backbone")) == 2
    assert "start the run with torchrun" in capsys.readouterr().err and not (tmp_path / "s").exists()
    # avalanche-ewc trains no delta, so it takes neither --method nor --no-dropout
    args = [a for a in opts(toy_yaml, tiny_backbone_dir, tmp_path / "a", "--strategy", "avalanche-ewc")
            if a not in ("--no-dropout", "--method", "lora:rank=4")]
    proc = torchrun(args)
    assert proc.returncode != 0 and "cannot run on 2 processes" in proc.stdout + proc.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_compare_on_two_worker_processes_gives_the_same_report(toy_yaml, tiny_backbone_dir, tmp_path, capfd):  # noqa: F811
    """Entries x seeds on a pool of 2 spawned processes: the report of the in-process run, number
    for number (each run is seeded by its own settings, not by its worker). The workers draw no
    library bars (transformers' "Loading weights" went to the log once per job)."""
    common = ["compare", "--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--entry", "per-task:lora:rank=4",
              "--entry", "seq-delta:lora:rank=4", "--seeds", "0,1", "--steps", "20", "--eval-every", "10", "--max-length", "16",
              "--no-progress", "--no-mlflow"]
    assert main([*common, "--out", str(tmp_path / "w1")]) == 0
    assert main([*common, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    said = capfd.readouterr()
    assert "on 2 local processes" in said.out and "Loading weights" not in said.err
    one, two = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("w1", "w2"))
    assert list(one) == list(two) == ["per-task-lora(rank=4)", "seq-delta-lora(rank=4)"]
    for label in one:
        assert one[label]["seeds"] == 2 and one[label]["ACC_std"] is not None
        for k in ("ACC", "BWT", "FWT", "forgetting", "ACC_std", "trainable_params_per_task"):
            assert one[label][k] == two[label][k], (label, k)
    for seed in (0, 1):  # the runs themselves: same matrices
        for label in one:
            a, b = (json.loads((tmp_path / d / label / f"s{seed}" / "results.json").read_text()) for d in ("w1", "w2"))
            assert a["matrix"] == b["matrix"]
    # a failing run does not stop the others; the error names it, and what finished is kept
    bad = [*common[:5], "--entry", "per-task:lora:rank=4", "--entry", "per-task:prompt:num_tokens=60", *common[9:],
           "--workers", "2", "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    err = capfd.readouterr().err
    assert "per-task-prompt" in err and "positions" in err and (tmp_path / "bad" / "per-task-lora(rank=4)" / "s1" / "results.json").exists()


def test_ranks_started_with_different_settings_all_stop_with_a_message(toy_yaml, tiny_backbone_dir, tmp_path):  # noqa: F811
    """``--lr`` on one node only: every rank refuses before training (formerly: exit 0, a matrix
    that disagreed with the checkpoints; with different --steps, a deadlock)."""
    script = tmp_path / "rank_args.py"
    script.write_text("import os, sys\nfrom continual.cli import main\nargs = sys.argv[1:]\n"
                      "if os.environ['RANK'] == '1':\n    args += ['--steps', '40', '--lr', '2e-2']\n"
                      "sys.exit(main(args))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *opts(toy_yaml, tiny_backbone_dir, tmp_path / "two")]
    proc = launch(cmd, timeout=180)
    assert proc.returncode != 0
    assert "rank(s) 1 differ from rank 0 in train.lr, train.max_steps" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "two" / "state.json").exists()


def test_a_stuck_rank_is_a_message_within_the_collective_timeout(toy_yaml, tiny_backbone_dir, tmp_path):  # noqa: F811
    """Rank 1 stalls before the first collective; with CONTINUAL_COLLECTIVE_TIMEOUT=5 rank 0 gives
    up within seconds with one line saying so (the default wait is 30 minutes)."""
    script = tmp_path / "stall.py"
    script.write_text("import os, sys, time\nimport continual.training.distributed as d\nfrom continual.cli import main\n"
                      "if os.environ['RANK'] == '1':\n    real = d.check_same\n"
                      "    def slow(*a, **k):\n        time.sleep(40)\n        return real(*a, **k)\n"
                      "    d.check_same = slow\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *opts(toy_yaml, tiny_backbone_dir, tmp_path / "two")]
    start = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "CONTINUAL_COLLECTIVE_TIMEOUT": "5"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    assert "rank 0 waited more than 5 s for the other processes" in err, err[-3000:]
    assert time.time() - start < 90
