"""Fault injection: kills, damaged files, a tracking server that goes away, bad settings and bad
input. Each must give a clear refusal (or carry on), never a silently different number, and lose
no finished task."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FAST, free_port, start_mlflow_server, stop_mlflow_server, toy_rows, toy_stream
from continual import MLflowLogger, RunStateError, StreamLogger, TrainConfig, make_strategy, run_stream
from continual.cli import main
from streams import DataError, load_stream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 10})
LORA = [{"method": "lora", "rank": 4}]
ROOT = Path(__file__).resolve().parents[1]


class Kill(StreamLogger):
    """Raises KeyboardInterrupt (a kill) at one point of row ``row``: 'train' (mid-training) or
    'log' (after the step's state was written, while it is being logged)."""

    def __init__(self, row, where):
        self.row, self.where, self.current = row, where, None

    def start_step(self, row, tasks, params):
        self.current = row

    def log_step(self, record):
        if self.where == "train" and self.current == self.row and record["step"] >= 10:
            raise KeyboardInterrupt("killed mid-training")

    def end_step(self, row, metrics, artifacts):
        if self.where == "log" and row == self.row:
            raise KeyboardInterrupt("killed between state and logging")


class Broken(StreamLogger):
    """A tracking backend that fails on every call after the first step starts."""

    def __init__(self):
        self.calls = 0

    def log_step(self, record):
        self.calls += 1
        raise RuntimeError("connection refused (the tracking server is down)")


def go(text_model, out, **kw):
    return run_stream(toy_stream(), text_model(), make_strategy("per-task", LORA), CONFIG, out, **kw)


@pytest.fixture(scope="module")
def models(minilm_tokenizer):
    from conftest import tiny_text_backbone

    import adapters

    return lambda: adapters.DeltaModel(tiny_text_backbone(minilm_tokenizer.vocab_size), minilm_tokenizer, "tiny-bert")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    """An uninterrupted run, the matrix every resumed or guarded run must reproduce."""
    return go(models, tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory, models):
    """A run killed while training its third task (two steps saved), made once per module."""
    out = tmp_path_factory.mktemp("killed") / "run"
    with pytest.raises(KeyboardInterrupt):
        go(models, out, loggers=[Kill(2, "train")])
    return out


@pytest.mark.parametrize("where", ["train", "log"])
def test_killed_runs_resume_to_the_uninterrupted_matrix(text_model, tmp_path, reference, where):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        go(text_model, out, loggers=[Kill(1, where)])
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ([0] if where == "train" else [0, 1])  # 'log': the step was saved before logging
    res = go(text_model, out, resume=True)
    np.testing.assert_array_equal(res.matrix.R, reference.matrix.R)
    assert [s["row"] for s in res.steps] == [0, 1, 2]


def test_a_failing_tracker_never_stops_a_run(text_model, tmp_path, reference, capsys):
    broken = Broken()
    res = go(text_model, tmp_path / "run", loggers=[broken])
    np.testing.assert_array_equal(res.matrix.R, reference.matrix.R)
    assert broken.calls == 1  # after the first failure the logger is silent for the run
    assert "connection refused" in res.tracking["sync_needed"]
    err = capsys.readouterr().err
    assert "Nothing is lost" in err and f"continual sync {tmp_path / 'run'}" in err


@pytest.fixture
def killed_run(killed_once, tmp_path):
    """A fresh copy of the killed run, for a test to damage."""
    return Path(shutil.copytree(killed_once, tmp_path / "run"))


@pytest.fixture
def finished_run(reference, tmp_path):
    """A fresh copy of the finished reference run."""
    return Path(shutil.copytree(reference.out_dir, tmp_path / "run"))


def flip(path, where=0.5, n=8):
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip-middle", "flip-header", "truncate", "delete"])
def test_damaged_state_tensors_are_refused_naming_the_file(text_model, killed_run, damage):
    tensors = next(killed_run.glob("state-step*.safetensors"))
    if damage == "flip-middle":
        flip(tensors, 0.5)
    elif damage == "flip-header":
        flip(tensors, 0.0, 4)
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    else:
        tensors.unlink()
    with pytest.raises(RunStateError, match=tensors.name):
        go(text_model, killed_run, resume=True)


def test_a_resume_refuses_a_run_that_lost_a_checkpoint(text_model, killed_run):
    """Resumed from its state tensors, such a run finished with exit 0 and a folder without the
    task's checkpoint, which route, transfer and export then refused (or passed over)."""
    lost = sorted((killed_run / "checkpoints").iterdir())[0]
    shutil.rmtree(lost)
    with pytest.raises(RunStateError, match=f"is missing files its manifest lists \\(checkpoints/{lost.name}/"):
        go(text_model, killed_run, resume=True)
    assert not (killed_run / "results.json").exists()


@pytest.mark.parametrize("content", ["[]", '{"version": 2}', '{"version": 1}', "{ truncated", "", "null"])
def test_damaged_state_json_is_refused(text_model, killed_run, content):
    (killed_run / "state.json").write_text(content)
    with pytest.raises(RunStateError, match="state.json"):
        go(text_model, killed_run, resume=True)


def test_an_edited_number_in_state_json_is_refused(text_model, killed_run):
    path = killed_run / "state.json"
    state = json.loads(path.read_text())
    state["matrix"]["R"][0][0] = 0.123  # valid JSON, plausible value: only the checksum can tell
    path.write_text(json.dumps(state))
    with pytest.raises(RunStateError, match="does not match its checksum"):
        go(text_model, killed_run, resume=True)


def test_damaged_results_and_checkpoints_are_refused(text_model, finished_run, capsys):
    from continual import load_run_tasks

    out = finished_run
    ckpt = out / "checkpoints" / "b" / "b" / "delta.safetensors"
    flip(ckpt, 0.6)
    with pytest.raises(RunStateError, match="checkpoints/b/b/delta.safetensors"):
        load_run_tasks(text_model(), out)
    results = json.loads((out / "results.json").read_text())
    results["metrics"]["ACC"] = 0.99
    (out / "results.json").write_text(json.dumps(results))
    assert main(["report", str(out)]) == 2
    assert "results.json does not match its checksum" in capsys.readouterr().err


@pytest.mark.parametrize("lost", ["checkpoints/b", "checkpoints/b/b/delta.json"])
def test_a_deleted_checkpoint_is_refused_not_passed_over(text_model, finished_run, capsys, lost):
    """A task's checkpoint folder deleted after the run was taken for a task not trained yet: route,
    transfer and export went on without it (or said the run was not a per-task run)."""
    from continual import load_run_tasks

    path = finished_run / lost
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(RunStateError, match="is missing files its manifest lists .*checkpoints/b/b/delta.json"):
        load_run_tasks(text_model(), finished_run)
    assert main(["export", str(finished_run), "--out", str(finished_run.parent / "peft")]) == 2
    assert "the run directory was damaged" in capsys.readouterr().err
    assert not (finished_run.parent / "peft").exists()


def toy_yaml(directory):
    """A one-task YAML stream of toy rows."""
    (directory / "a.csv").write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in toy_rows("apple", 1, 60)) + "\n")
    (directory / "toy.yaml").write_text(yaml.safe_dump({"name": "toy", "tasks": [{"name": "a", "train": "a.csv"}]}))
    return directory / "toy.yaml"


def test_overwrite_deletes_nothing_when_the_command_is_invalid(finished_run, tmp_path, capsys, tiny_backbone_dir):
    out = finished_run
    before = sorted(p.name for p in out.iterdir())
    base = ["run", "--stream", str(toy_yaml(tmp_path)), "--backbone", str(tiny_backbone_dir), "--out", str(out), "--overwrite",
            "--no-mlflow", "--no-progress"]
    for bad in (["--device", "cuda:7"], ["--lr", "nan"], ["--max-length", "100000"]):
        assert main(base + bad) == 2
        assert sorted(p.name for p in out.iterdir()) == before and (out / "results.json").exists()
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "lr must be a number > 0 and <= 100" in err and "exceeds the 64 positions" in err


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_folder_of_the_users_files_is_not_taken_for_a_run(tmp_path, capsys, tiny_backbone_dir, extra):
    # no state.json: nothing there is a run of ours, so nothing there may be replaced by one
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"my": "numbers"}')
    argv = ["run", "--stream", str(toy_yaml(tmp_path)), "--backbone", str(tiny_backbone_dir), "--out", str(out),
            "--no-mlflow", "--no-progress", *extra]
    assert main(argv) == 2
    assert "holds results.json but no state.json" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"my": "numbers"}' and sorted(p.name for p in out.iterdir()) == [".lock", "results.json"]


@pytest.mark.parametrize("bad, message", [
    (["--lr", "nan"], "lr must be a number > 0 and <= 100, got nan"),
    (["--lr", "-1"], "lr must be a number > 0 and <= 100, got -1.0"),
    (["--eval-every", "0"], "eval_every must be an integer >= 1"),
    (["--max-length", "0"], "max_length must be an integer >= 1"),
    (["--max-length", "63", "--method", "prompt:num_tokens=8"], "max_length 63 + 8 prepended positions (prompt) exceeds"),
    # two input transforms in one combination each prepend their own tokens: 56 + 5 + 2*3 > 64
    (["--max-length", "56", "--method", "prompt:num_tokens=5", "--method", "prompt_pool:top_k=2,prompt_length=3"],
     "max_length 56 + 11 prepended positions (prompt, prompt_pool) exceeds"),
    # the remedy offered must exist: no max_length helps when the prompt alone fills the table
    (["--max-length", "16", "--method", "prompt:num_tokens=100"], "; prepend at most 48 positions (e.g. num_tokens)"),
    (["--max-length", "50", "--method", "prompt:num_tokens=20"], "; use a max_length of at most 44 or prepend at most 14 positions (e.g. num_tokens)"),
    # at the table's full length neither alone fits: both must move
    (["--max-length", "64", "--method", "prompt:num_tokens=100"], "; use a smaller max_length and prepend fewer positions (max_length + prepended positions at most 64)"),
    # only the methods that prepend are named: prefix tuning adds keys, not positions
    (["--max-length", "50", "--method", "prompt:num_tokens=20", "--method", "prefix"], "20 prepended positions (prompt) exceeds"),
    (["--tracking-uri", "sqlite:///"], "names no database file"),
    # MLflow 3 refuses to open a directory store: the run had trained, then said logging stopped
    (["--tracking-uri", "mlruns"], "mlruns: this MLflow version refuses file stores"),
    (["--tracking-uri", "file:./mlruns"], "use a database store such as sqlite:///mlflow.db"),
])
def test_invalid_settings_are_refused_before_anything_runs(tiny_backbone_dir, tmp_path, capsys, bad, message):
    argv = ["run", "--stream", str(toy_yaml(tmp_path)), "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path / "o"),
            "--no-progress", *bad]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_task_length_that_does_not_fit_is_named_as_the_tasks_own(tiny_backbone_dir, tmp_path, capsys):
    """A task's own max_length (BBC's 128) wins over --max-length: the refusal says where it came from."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [{"name": "news", "source": "bbc", "max_length": 100}]}))
    argv = ["run", "--stream", str(tmp_path / "s.yaml"), "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path / "o"),
            "--max-length", "16", "--no-progress", "--no-mlflow"]
    assert main(argv) == 2
    assert "max_length 100 (task news's own: set it with max_length in a stream file) exceeds the 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_stream_files_are_clear_errors(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nhello,pos\nworld,NaN\nfoo,neg\n")
    cases = {
        "nan.yaml": ({"name": "x", "tasks": [{"name": "a", "train": "a.csv"}]}, "row 2, column 'label': missing label ('NaN'"),
        "list.yaml": ({"name": "x", "tasks": [{"name": ["a", "b"], "source": "movie"}]}, "task name must be a string"),
        "space.yaml": ({"name": "x", "tasks": [{"name": "a b", "source": "movie"}]}, "invalid task name 'a b'"),
    }
    for file, (spec, message) in cases.items():
        (tmp_path / file).write_text(yaml.safe_dump(spec))
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            load_stream(tmp_path / file)
    levels = ["[lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb = "name: x\nlabel_names: &a0 " + levels[0] + "\n"
    for i in range(1, 9):
        bomb += f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    (tmp_path / "bomb.yaml").write_text(bomb + "tasks: [{name: a, source: movie}]\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 600
    with pytest.raises(DataError, match="expands to more than"):
        load_stream(tmp_path / "bomb.yaml")
    os.symlink(tmp_path / "loop2.yaml", tmp_path / "loop1.yaml")
    os.symlink(tmp_path / "loop1.yaml", tmp_path / "loop2.yaml")
    with pytest.raises(DataError, match="cannot be read"):
        load_stream(tmp_path / "loop1.yaml")


def test_a_closed_tracking_port_fails_over_within_seconds(text_model, tmp_path, reference):
    start = time.perf_counter()
    res = go(text_model, tmp_path / "run", loggers=[MLflowLogger(f"http://127.0.0.1:{free_port()}")])
    assert time.perf_counter() - start < 30 + reference.seconds
    np.testing.assert_array_equal(res.matrix.R, reference.matrix.R)
    assert "Connection" in res.tracking["sync_needed"]  # refused by the closed port, nothing else


def test_server_stopped_mid_run_loses_nothing_and_sync_uploads_it(text_model, tmp_path, reference):
    from mlflow import MlflowClient

    proc, url = start_mlflow_server(tmp_path, "server")
    try:
        class StopServer(StreamLogger):  # after the first task is logged, the server goes away
            def log_matrix(self, row, *args):
                if row == 0:
                    stop_mlflow_server(proc)

        start = time.perf_counter()
        res = go(text_model, tmp_path / "run", loggers=[MLflowLogger(url), StopServer()])
        assert time.perf_counter() - start < 30 + reference.seconds
    finally:
        stop_mlflow_server(proc)
    np.testing.assert_array_equal(res.matrix.R, reference.matrix.R)
    assert res.tracking["sync_needed"] and len(res.steps) == 3
    # logging worked until the server went away: task 1 reached it (read from its store directly)
    served = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}").get_run(res.tracking["parent_run_id"])
    assert "R.0.0" in served.data.metrics and "R.1.1" not in served.data.metrics
    store = f"sqlite:///{tmp_path / 'later.db'}"
    assert main(["sync", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    client = MlflowClient(store)
    parent = client.get_run(results["tracking"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ACC"] == pytest.approx(res.metrics["ACC"])
    assert {f"R.{i}.{j}" for i in range(3) for j in range(i + 1)} <= set(parent.data.metrics)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and all("train/loss" in c.data.metrics for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.json", "heatmap.png"}
    # a second sync (a retried script) logged a second copy, which MLflow's views counted twice
    experiment = [parent.info.experiment_id]
    assert main(["sync", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    assert len(client.search_runs(experiment, "attributes.run_name = 'run'")) == 1
    assert main(["sync", str(tmp_path / "run"), "--tracking-uri", store, "--again"]) == 0
    assert len(client.search_runs(experiment, "attributes.run_name = 'run'")) == 2
    # a run still going (its lock held) is not synced: it would be logged unfinished, and two
    # writers of its state.json could each drop the other's save
    from continual.rundir import RunLock

    lock = RunLock(tmp_path / "run").acquire()
    try:
        assert main(["sync", str(tmp_path / "run"), "--tracking-uri", store, "--again"]) == 2
    finally:
        lock.release()
    assert len(client.search_runs(experiment, "attributes.run_name = 'run'")) == 2


def test_two_runs_starting_together_on_a_new_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = ("import adapters, sys; from continual import MLflowLogger; "
            "lg = MLflowLogger(sys.argv[1], 'race'); print(lg.start_stream('s', {'a': 1}, None)['parent_run_id'])")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
             for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-1500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 3  # three runs, one store


def test_the_store_lock_nests_in_one_thread_and_still_excludes_another(tmp_path):
    # `continual run --resume` of a run tracked in SQLite hung for ever: the logger took the store's
    # lock, then made its client, which took it again on a new descriptor and waited on itself.
    # Threads here, so that without the fix this fails after seconds instead of hanging the suite.
    import threading

    from continual.guard import store_lock

    uri = f"sqlite:///{tmp_path}/x.db"
    nested, other = threading.Event(), threading.Event()

    def twice() -> None:
        with store_lock(uri), store_lock(uri):
            nested.set()

    thread = threading.Thread(target=twice, daemon=True)
    thread.start()
    thread.join(10)
    assert nested.is_set(), "a nested store_lock in one thread waited on itself"
    with store_lock(uri):  # another thread still waits while this one holds it
        def wait() -> None:
            with store_lock(uri):
                other.set()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(1)
        assert not other.is_set()
    waiter.join(10)
    assert other.is_set()
