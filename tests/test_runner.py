"""The stream scheduler on a tiny BERT and toy keyword tasks: the accuracy matrix, no forgetting
with one delta per task, forgetting with the baselines, resume, MLflow contents."""

import math

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import MLflowLogger, RunStateError, StreamLogger, TrainConfig, evaluate, make_strategy, run_stream
from continual.strategies import SequentialFineTune
from continual.identity import identity_differences

CONFIG = TrainConfig(**FAST)
LORA = [{"method": "lora", "rank": 4}]


def run(text_model, tmp_path, strategy, name="run", **kw):
    return run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / name, **kw)


class Recorder(StreamLogger):
    """Keeps what the runner reports; optionally raises mid-training (a kill)."""

    def __init__(self, kill_at_row=None):
        self.kill_at_row, self.row, self.records, self.rows = kill_at_row, None, [], []

    def start_step(self, row, tasks, params):
        self.row = row

    def log_step(self, record):
        self.records.append(record)
        if self.row == self.kill_at_row and record["step"] >= 10:  # mid-training (records come every 10 steps)
            raise KeyboardInterrupt("killed")

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self.rows.append(row)


def test_per_task_deltas_never_forget(text_model, tmp_path):
    model = text_model()
    stream = toy_stream()
    first = {}

    class Snapshot(StreamLogger):  # old tasks' logits right after they were trained
        def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
            t = stream[row]
            batch = model.tokenizer(list(t.test["text"]), padding=True, return_tensors="pt")
            with torch.no_grad(), model.using(t.name):
                first[t.name] = model(**batch)

    res = run_stream(stream, model, make_strategy("per-task", LORA), CONFIG, tmp_path / "r",
                     loggers=[Snapshot()])
    R = res.matrix.R
    assert np.all(np.diag(R) >= 0.9), R  # the toy tasks are learned
    assert res.metrics["BWT"] == 0.0 and res.metrics["forgetting"] == 0.0  # exactly, not approximately
    np.testing.assert_array_equal(R[2, :2], np.diag(R)[:2])
    for t in stream:  # bit-identical predictions of old tasks after all later tasks
        batch = model.tokenizer(list(t.test["text"]), padding=True, return_tensors="pt")
        with torch.no_grad(), model.using(t.name):
            assert torch.equal(model(**batch), first[t.name])
    # LoRA starts as the identity and heads are seeded: the untrained new delta scores b exactly
    assert res.metrics["FWT"] == 0.0
    assert not np.isnan(res.matrix.b).any()
    # the full R: lower triangle + diagonal + the pre-training entries R[j-1, j]; nothing else
    measured = ~np.isnan(R)
    assert measured.tolist() == [[True, True, False], [True, True, True], [True, True, True]]


def test_sequential_fine_tuning_forgets(text_model, tmp_path):
    res = run(text_model, tmp_path, SequentialFineTune(backbone_lr=1e-2))
    assert res.metrics["BWT"] < 0 and res.metrics["forgetting"] > 0, res.table()
    assert res.steps[0]["trainable_params"]["a"] > text_model().backbone_parameters()


def test_shared_delta_and_joint(text_model, tmp_path):
    seq = run(text_model, tmp_path, make_strategy("seq-delta", LORA), "seq")
    assert not math.isnan(seq.metrics["BWT"]) and seq.matrix.R[0, 0] >= 0.7
    joint = run(text_model, tmp_path, make_strategy("joint", LORA), "joint")
    R = joint.matrix.R
    assert np.isnan(R[:2]).all() and not np.isnan(R[2]).any()  # one multi-task step: the last row only
    assert joint.metrics["ACC"] >= 0.8 and math.isnan(joint.metrics["BWT"])
    assert joint.steps[0]["steps"] <= 3 * CONFIG.max_steps


@pytest.mark.slow  # the CLI's SIGKILL-ed run resumed (test_cli) checks the same in the default suite
@pytest.mark.integration
def test_resume_after_a_kill_gives_the_same_matrix(text_model, tmp_path):
    full = run(text_model, tmp_path, make_strategy("per-task", LORA), "full")
    killer = Recorder(kill_at_row=2)
    with pytest.raises(KeyboardInterrupt):
        run(text_model, tmp_path, make_strategy("per-task", LORA), "killed", loggers=[killer])
    assert killer.rows == [0, 1]
    with pytest.raises(RunStateError, match=r"2/3 stream steps done: tasks trained.*--resume"):
        run(text_model, tmp_path, make_strategy("per-task", LORA), "killed")
    again = Recorder()
    resumed = run(text_model, tmp_path, make_strategy("per-task", LORA), "killed", loggers=[again], resume=True)
    assert again.rows == [2]  # tasks a and b were not retrained
    assert {r["step"] for r in again.records} <= set(range(1, CONFIG.max_steps + 1))
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)
    np.testing.assert_array_equal(resumed.matrix.F1, full.matrix.F1)
    np.testing.assert_array_equal(resumed.matrix.b, full.matrix.b)
    assert [s["tasks"] for s in resumed.steps] == [["a"], ["b"], ["c"]]
    assert sorted(p.name for p in (tmp_path / "killed").glob("state-step*.safetensors")) == ["state-step2.safetensors"]


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_resume_of_seq_ft_restores_the_backbone(text_model, tmp_path):
    full = run(text_model, tmp_path, SequentialFineTune(backbone_lr=1e-2), "full")
    with pytest.raises(KeyboardInterrupt):
        run(text_model, tmp_path, SequentialFineTune(backbone_lr=1e-2), "k", loggers=[Recorder(kill_at_row=1)])
    resumed = run(text_model, tmp_path, SequentialFineTune(backbone_lr=1e-2), "k", resume=True)
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)


def test_mismatched_or_damaged_state_is_refused(text_model, tmp_path):
    run(text_model, tmp_path, make_strategy("per-task", LORA), "r")
    with pytest.raises(RunStateError, match=r"differs in: strategy.methods\[0\].method: .lora. there, .bitfit. now\)"):
        run(text_model, tmp_path, make_strategy("per-task", ["bitfit"]), "r", resume=True)
    (tmp_path / "r" / "state.json").write_text("{ truncated")
    with pytest.raises(RunStateError, match="damaged"):
        run(text_model, tmp_path, make_strategy("per-task", LORA), "r", resume=True)
    res = run(text_model, tmp_path, make_strategy("per-task", LORA), "r", overwrite=True)
    assert res.metrics["BWT"] == 0.0


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_mlflow_sqlite_store_holds_the_run(text_model, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run(text_model, tmp_path, make_strategy("per-task", LORA), loggers=[MLflowLogger(uri, "t", "toy-run")])
    client = MlflowClient(uri)
    parent = client.get_run(res.tracking["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "toy-run"
    p, m = parent.data.params, parent.data.metrics
    assert p["strategy.strategy"] == "per-task" and p["seed"] == "0" and len(p["data.a"]) == 16
    assert m["BWT"] == 0.0 and m["ACC"] == pytest.approx(res.metrics["ACC"])
    assert m["R.2.0"] == pytest.approx(res.matrix.R[2, 0])
    assert [x.value for x in client.get_metric_history(parent.info.run_id, "acc/a")] == list(res.matrix.R[:, 0])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"heatmap.png", "matrix.csv", "results.json", "stream.yaml"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    child = next(c for c in children if c.data.tags["row"] == "1")
    assert child.data.params["b.labels"] == "no,yes"
    n, cfg = res.steps[1]["steps"], TrainConfig(**FAST)  # a record every log_every steps and at each dev eval
    logged = [s for s in range(1, n + 1) if s % cfg.log_every == 0 or s % cfg.eval_every == 0 or s == n]
    assert [int(m.step) for m in client.get_metric_history(child.info.run_id, "train/loss")] == logged
    assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/b"]


def test_evaluate_with_active_tasks_matches_using(text_model):
    from continual import eval_loader

    stream = toy_stream()
    model = text_model()
    model.add_task("shared", LORA)
    model.add_task("a", [], label_names=["no", "yes"])
    loader = eval_loader(stream["a"].test, model.tokenizer, 16)
    with_shared = evaluate(model, "a", loader, ("shared", "a"))
    alone = evaluate(model, "a", loader)
    assert with_shared == alone  # zero-init LoRA: identical until trained
    with pytest.raises(Exception, match="unknown task"):
        evaluate(model, "a", loader, ("nope", "a"))


@pytest.mark.parametrize("methods", [
    [{"method": "prefix", "num_tokens": 3, "hidden_dim": 16}, "bitfit"],  # folded on freeze
    [{"method": "prompt", "num_tokens": 4}],
])
def test_resume_rebuilds_folded_and_prompt_deltas(text_model, tmp_path, methods):
    config = TrainConfig(**{**FAST, "max_steps": 20, "eval_every": 10})
    go = lambda name, **kw: run_stream(toy_stream(), text_model(), make_strategy("per-task", methods), config,  # noqa: E731
                                       tmp_path / name, **kw)
    full = go("full")
    with pytest.raises(KeyboardInterrupt):
        go("k", loggers=[Recorder(kill_at_row=1)])
    resumed = go("k", resume=True)
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)
    assert resumed.metrics["BWT"] == 0.0


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_continual_fusion_stream_resumes_and_never_forgets(text_model, tmp_path):
    """per-task-fusion: each task is scored through a fusion over every delta so far; all frozen,
    so BWT is exactly 0; a kill during task c's fusion stage resumes to the same matrix."""
    strategy = lambda: make_strategy("per-task-fusion", LORA)  # noqa: E731
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    full = run(text_model, tmp_path, strategy(), "full", loggers=[MLflowLogger(uri, "t", "fusion-run")])
    assert full.metrics["BWT"] == 0.0
    assert np.all(np.diag(full.matrix.R) >= 0.8), full.matrix.R  # learned (the toy tasks' chance is 0.5)
    ckpt = tmp_path / "full" / "checkpoints" / "c"
    assert sorted(p.name for p in ckpt.iterdir()) == ["c", "c_fusion"]
    import json

    meta = json.loads((ckpt / "c_fusion" / "delta.json").read_text())
    assert meta["methods"][0]["sources"] == ["a", "b", "c"]
    table = (tmp_path / "full" / "reports" / "c" / "fusion-c_fusion.md").read_text()
    assert table.startswith("| module | a | b | c |")
    assert (tmp_path / "full" / "reports" / "c" / "fusion-c_fusion.png").stat().st_size > 1000
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    step = client.search_runs([client.get_run(full.tracking["parent_run_id"]).info.experiment_id], "tags.row = '2'")[0]
    logged = {a.path for a in client.list_artifacts(step.info.run_id, "fusion")}
    assert logged == {f"fusion/fusion-c_fusion.{x}" for x in ("csv", "md", "png")}
    assert {a.path for a in client.list_artifacts(step.info.run_id, "checkpoint")} == {"checkpoint/c", "checkpoint/c_fusion"}

    class KillInStage2(Recorder):
        def log_step(self, record):
            self.records.append(record)
            if self.row == 2 and record.get("stage") == 2:
                raise KeyboardInterrupt("killed")

    killer = KillInStage2()
    with pytest.raises(KeyboardInterrupt):
        run(text_model, tmp_path, strategy(), "killed", loggers=[killer])
    assert killer.records[-1]["step"] > CONFIG.max_steps // 2  # stage-2 steps continue stage 1's count
    resumed = run(text_model, tmp_path, strategy(), "killed", resume=True)
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)


@pytest.mark.parametrize("uri", ["sqlit:///x.db", "bogus://x", "htp://127.0.0.1:5000"])
def test_a_logger_on_a_scheme_no_store_serves_is_refused_when_made(uri, tmp_path):
    # the library's edge, as the commands' is theirs: before, the logger was made, the stream
    # trained untracked with one warning, and the run pointed at a sync that fails the same way
    from continual.tracking import client_for

    with pytest.raises(ValueError, match="MLflow has no tracking store for its scheme"):
        MLflowLogger(uri, "t", "typo")
    with pytest.raises(ValueError, match="MLflow has no tracking store for its scheme"):
        client_for(uri)
    MLflowLogger(f"sqlite:///{tmp_path}/ok.db", "t", "fine")  # a served scheme is still taken as it is


def test_a_database_store_without_its_driver_is_refused_when_made():
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed here: the refusal is for a machine without it")
    # it ran untracked ("No module named 'psycopg'") and pointed at a sync that failed alike
    with pytest.raises(ValueError, match=r"'postgresql://u:\*\*\*@127.0.0.1:9/db': its database driver is not installed"):
        MLflowLogger("postgresql://u:secret@127.0.0.1:9/db", "t", "pg")


def test_a_different_run_is_named_down_to_the_setting():
    saved = {"train": {"lr": 0.01, "steps": 5}, "tasks": ["a", "b"], "backbone": "f" * 64,
             "strategy": {"strategy": "per-task", "methods": [{"method": "lora", "rank": 4}]}}
    asked = {"train": {"lr": 0.001, "steps": 5}, "tasks": ["a", "b", "c"], "backbone": "0" * 64,
             "strategy": {"strategy": "per-task", "methods": [{"method": "lora", "rank": 8}]}}
    assert identity_differences(saved, saved) == []
    assert identity_differences(saved, asked) == [
        f"backbone: '{'f' * 19}... there, '{'0' * 19}... now", "strategy.methods[0].rank: 4 there, 8 now",
        "tasks: ['a', 'b'] there, ['a', 'b', 'c'] now", "train.lr: 0.01 there, 0.001 now"]
    many = {"x": {str(i): i for i in range(5)}}
    assert identity_differences(many, {"x": {str(i): -i for i in range(1, 6)}})[-1] == "3 more in x"
