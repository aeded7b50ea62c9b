"""Trust, second round: inputs and situations that used to give a silent wrong number, lose a
finished run, or end in a traceback. Each gives one clear refusal now, before anything is trained."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import adapters
from conftest import FAST, toy_rows, toy_stream
from continual import RunStateError, TrainConfig, make_strategy, run_stream
from continual.cli import main
from continual.rundir import RunLock
from continual.training import DivergedError, train_task
from continual.training.protocol import Protocol
from streams import DataError, load_stream

CONFIG = TrainConfig(**{**FAST, "max_steps": 20, "eval_every": 10})


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")


def stream_file(tmp_path, **task) -> str:
    write_csv(tmp_path / "a.csv", toy_rows("apple", 1, 40))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [{"name": "a", "train": "a.csv", **task}]}))
    return str(tmp_path / "s.yaml")


def test_negative_caps_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--max-train", "-5", "--out", str(tmp_path / "o")])
    assert "-5 is negative; use 0 for none" in capsys.readouterr().err
    with pytest.raises(DataError, match="max_train must be a whole number >= 1"):
        load_stream("default", max_train=-5)
    with pytest.raises(DataError, match="max_eval must be a whole number >= 1"):
        load_stream(stream_file(tmp_path, max_eval=-1))
    # a stream-wide cap is named as one, not as its first task's key
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"name": "w", "max_train": 0, "tasks": [{"name": "a", "train": "a.csv"}]}))
    with pytest.raises(DataError, match=r"w\.yaml: max_train must be a whole number >= 1 \(or absent: no cap\), got 0$"):
        load_stream(tmp_path / "w.yaml")


@pytest.mark.parametrize("key,value", [("generative", True), ("template", "Q: {text} A:"), ("metric", "rouge_l"),
                                       ("answers", {"0": "no"})])
def test_generative_keys_on_a_file_task_without_targets_are_refused(tmp_path, key, value):
    with pytest.raises(DataError, match="target_column"):
        load_stream(stream_file(tmp_path, **{key: value}))


def test_a_template_with_an_unknown_placeholder_is_a_data_error(tmp_path):
    write_csv(tmp_path / "g.csv", [("hello there", "hi"), ("good bye", "bye")] * 10, "text,target")
    spec = {"name": "g", "tasks": [{"name": "g", "train": "g.csv", "target_column": "target", "template": "{text} {lang}:"}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match=r"only the placeholder \{text\}, not \{lang\}"):
        load_stream(tmp_path / "g.yaml")
    spec["tasks"][0]["template"] = "{text} {"
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match="malformed"):
        load_stream(tmp_path / "g.yaml")


def test_source_task_metric_other_than_exact_is_refused(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "m", "source": "movie", "generative": True, "metric": "rouge_l"}]}))
    with pytest.raises(DataError, match="scored by exact match"):
        load_stream(tmp_path / "s.yaml", max_train=20, max_eval=20)


def test_bad_cells_and_headers_name_the_file_row_and_column(tmp_path):
    (tmp_path / "dup.csv").write_text("text,text,label\nfirst,second,0\nthird,fourth,1\n")
    with pytest.raises(DataError, match="'text' more than once"):
        load_stream(stream_file(tmp_path, train="dup.csv"))
    pd.DataFrame({"text": ["a b", "c d"] * 10, "label": [[1, 2], [3]] * 10}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(DataError, match="row 1, column 'label': a nested value"):
        load_stream(stream_file(tmp_path, train="n.parquet"))
    write_csv(tmp_path / "big.csv", [("x" * 1_000_001, 0)] + toy_rows("apple", 1, 20))
    with pytest.raises(DataError, match="row 1, column 'text': 1,000,001 characters"):
        load_stream(stream_file(tmp_path, train="big.csv"))


def test_lora_rank_above_the_layer_width_is_refused(minilm_tokenizer):
    from conftest import tiny_text_backbone

    model = adapters.DeltaModel(tiny_text_backbone(minilm_tokenizer.vocab_size), minilm_tokenizer, "tiny-bert")
    with pytest.raises(adapters.ConfigError, match="lora rank 100000 is above the width"):
        model.add_task("t", [{"method": "lora", "rank": 100000}], label_names=["a", "b"])
    assert "t" not in model.tasks


def test_a_schedule_that_cannot_train_is_refused_and_warm_up_never_stops_early():
    with pytest.raises(ValueError, match="more than the 10,000,000 steps"):
        TrainConfig(max_steps=10**12).validate()
    p = torch.nn.Parameter(torch.zeros(1))
    config = TrainConfig(max_steps=12, eval_every=1, patience=2, warmup_ratio=0.5, progress=False)
    protocol = Protocol(config, [p], torch.optim.SGD([p], lr=1.0), dev=lambda: {"accuracy": 0.5})
    stopped_at = None
    while not protocol.should_stop:
        protocol.before_step()
        protocol.after_step(torch.tensor(1.0), 1)
        stopped_at = protocol.step
    # no dev gain ever: patience (2) counts only after the 6 warm-up steps, so it stops at 8, not 3
    assert stopped_at == 8


def test_a_diverged_training_stops_with_the_reason_not_chance_level_scores(text_model, tmp_path, capsys):
    # NaN logits score as label 0 everywhere: a diverged task printed chance-level accuracy, exit 0
    config = TrainConfig(max_steps=12, eval_every=6, log_every=4, progress=False)
    p = torch.nn.Parameter(torch.zeros(1))
    protocol = Protocol(config, [p], torch.optim.SGD([p], lr=1.0), dev=lambda: {"accuracy": 0.5}, desc="train t")
    losses = [1.0, 1.0, 1.0, 1.0, 1.0, float("inf")]
    protocol.after_step(torch.tensor(losses[0]), 1)
    with pytest.raises(DivergedError, match="train t: the training loss became inf between steps 5 and 6"):
        for loss in losses[1:]:
            protocol.before_step()
            protocol.after_step(torch.tensor(loss), 1)
    model = text_model()
    model.add_task("t", "lora", label_names=["a", "b"])
    with torch.no_grad():
        next(model.task("t").parameters()).fill_(float("nan"))
    data = toy_stream()[0].splits()
    with pytest.raises(DivergedError, match="lower the learning rate"):
        train_task(model, "t", data, CONFIG)

def test_a_run_that_fine_tuned_its_backbone_can_be_routed_and_reloaded(tmp_path, tiny_backbone_dir, capsys):
    # seq-ft saves each task's head against the backbone of its time, and the backbone as the run
    # left it: every study of such a run was refused ("saved for another backbone")
    from continual.loadrun import load_run_model, load_run_tasks
    from continual.studies.route import route_run

    for name, word, seed in (("a", "apple", 1), ("b", "river", 2)):
        write_csv(tmp_path / f"{name}.csv", toy_rows(word, seed, 40))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [{"name": "a", "train": "a.csv"},
                                                                             {"name": "b", "train": "b.csv"}]}))
    run = tmp_path / "run"
    assert main(["run", "--stream", str(tmp_path / "s.yaml"), "--strategy", "seq-ft", "--backbone", str(tiny_backbone_dir),
                 "--steps", "6", "--max-length", "16", "--no-progress", "--no-mlflow", "--out", str(run)]) == 0
    (routed,) = route_run(run, routers=["prototype"])
    final = json.loads((run / "results.json").read_text())["matrix"]["R"][-1]
    assert np.mean(list(routed.oracle_accuracy.values())) == pytest.approx(np.mean(final))  # the run's last row
    assert load_run_model(run)[1] == ["a", "b"]
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 2  # said why, before loading anything
    assert "fine-tuned its whole backbone" in capsys.readouterr().err
    with pytest.raises(RunStateError, match="fine-tuned its backbone"):  # heads onto the untrained backbone
        load_run_tasks(adapters.DeltaModel.from_pretrained(str(tiny_backbone_dir)), run)

def test_route_and_transfer_of_a_shared_delta_run_are_refused_before_the_backbone_loads(tmp_path, tiny_backbone_dir,
                                                                                      capsys, monkeypatch):
    from continual.studies import route as route_module

    for name, word, seed in (("a", "apple", 1), ("b", "river", 2)):
        write_csv(tmp_path / f"{name}.csv", toy_rows(word, seed, 40))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [{"name": "a", "train": "a.csv"},
                                                                             {"name": "b", "train": "b.csv"}]}))
    run = tmp_path / "run"
    assert main(["run", "--stream", str(tmp_path / "s.yaml"), "--strategy", "seq-delta", "--method", "lora",
                 "--backbone", str(tiny_backbone_dir), "--steps", "4", "--max-length", "16", "--no-progress",
                 "--no-mlflow", "--out", str(run)]) == 0

    def loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the refusal")

    monkeypatch.setattr(route_module, "load_run_model", loading)
    capsys.readouterr()
    for command in ("route", "transfer"):
        assert main([command, str(run)]) == 2
        err = capsys.readouterr().err
        assert "holds tasks ['a', 'a-shared_delta', 'b', 'b-shared_delta'] for stream tasks ['a', 'b']" in err, err


def test_out_that_cannot_hold_a_run_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "under"):
        assert main(["run", "--backbone", "no-such-backbone", "--out", str(out), "--no-mlflow"]) == 2
        assert "is a file, not a directory" in capsys.readouterr().err  # not the backbone: --out comes first
    if os.geteuid() != 0:  # root writes through permission bits; a read-only mount is what it cannot write
        (tmp_path / "ro").mkdir(mode=0o555)
        assert main(["run", "--backbone", "no-such-backbone", "--out", str(tmp_path / "ro" / "o"), "--no-mlflow"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_an_experiment_the_store_deleted_is_refused_before_anything_loads(tmp_path, capsys):
    """MLflow keeps a deleted experiment's name and refuses runs in it: a run there trained
    unlogged, then pointed at a ``continual sync`` into the same experiment, which failed alike."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    for name in ("gone", "continual", "combinations"):
        client.delete_experiment(client.create_experiment(name))
    commands = [["run", "--experiment", "gone", "--out", str(tmp_path / "r")],
                ["compare", "--out", str(tmp_path / "c")],  # its runs go to the default experiment, continual
                ["combine", "--task", "movie", "--out", str(tmp_path / "k")]]
    for command in commands:
        assert main([*command, "--backbone", "no-such-backbone", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert "was deleted in" in err and "mlflow experiments restore --experiment-id" in err, err
    assert main(["sync", str(tmp_path / "nothing"), "--experiment", "gone", "--tracking-uri", uri]) == 2
    assert "experiment 'gone' was deleted" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "rck")
    # a store that does not exist yet is not made by the check (the run makes it when it logs)
    assert main(["run", "--backbone", "no-such-backbone", "--tracking-uri", f"sqlite:///{tmp_path}/new.db",
                 "--out", str(tmp_path / "n")]) == 2
    assert "was deleted" not in capsys.readouterr().err and not (tmp_path / "new.db").exists()


def test_an_experiment_name_mlflow_cannot_hold_is_refused_before_anything_loads(tmp_path, capsys):
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from continual.tracking import MAX_EXPERIMENT_NAME, MLflowLogger

    assert MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH
    # 501 characters: the run trained unlogged, MLflow refusing the name only when the first run was made
    with pytest.raises(SystemExit) as e:
        main(["run", "--backbone", "no-such-backbone", "--experiment", "e" * 501, "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "MLflow takes at most 500 characters, got 501" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1 to 500 characters"):
        MLflowLogger(f"sqlite:///{tmp_path}/m.db", "e" * 501)
    assert MLflowLogger(f"sqlite:///{tmp_path}/m.db", "e" * 500).experiment == "e" * 500


def test_resume_and_overwrite_together_are_refused(text_model, tmp_path, capsys):
    """Together, --resume had won, and a run that did not match was told to use --overwrite, given already."""
    with pytest.raises(SystemExit) as e:
        main(["run", "--backbone", "no-such-backbone", "--resume", "--overwrite", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give one of them"):
        run_stream(toy_stream(), text_model(), make_strategy("per-task", ["lora"]), CONFIG, tmp_path / "r",
                   resume=True, overwrite=True)
    assert not (tmp_path / "r").exists()


def test_a_ray_pool_without_ray_is_refused_before_anything_loads(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here: the refusal is for a machine without it")
    # it was a traceback (RuntimeError) raised once the study had started
    assert main(["compare", "--backbone", "no-such-backbone", "--ray-address", "auto", "--no-mlflow",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--ray-address needs ray: pip install" in capsys.readouterr().err  # not the backbone: ray is checked first
    assert not (tmp_path / "c").exists()


def test_a_second_run_on_a_directory_in_use_is_refused(text_model, tmp_path):
    out = tmp_path / "run"
    held = RunLock(out).acquire()  # another live run (the lock is per open file: this process counts as another)
    try:
        for overwrite in (False, True):
            with pytest.raises(RunStateError, match="in use by another run"):
                run_stream(toy_stream(), text_model(), make_strategy("per-task", [{"method": "lora", "rank": 4}]), CONFIG,
                           out, overwrite=overwrite)
        assert not (out / "state.json").exists()
    finally:
        held.release()
    run_stream(toy_stream(), text_model(), make_strategy("per-task", [{"method": "lora", "rank": 4}]), CONFIG, out)
    RunLock(out).acquire().release()  # the finished run let go of it


def test_overwrite_removes_the_old_runs_checkpoints(text_model, tmp_path):
    from streams import TaskStream

    out = tmp_path / "run"
    strategy = lambda: make_strategy("per-task", [{"method": "lora", "rank": 4}])  # noqa: E731
    run_stream(toy_stream(), text_model(), strategy(), CONFIG, out)
    assert (out / "checkpoints" / "c").is_dir()
    short = TaskStream("toy", toy_stream().tasks[:2])
    run_stream(short, text_model(), strategy(), CONFIG, out, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["a", "b"]


def _refuse(job: str) -> str:
    if job.startswith("bad"):
        raise ValueError(f"no such backbone {job[3:] or 'x'}")
    return job


def test_a_study_whose_runs_all_fail_alike_says_it_once():
    from continual.studies.pool import PoolError, run_all

    with pytest.raises(PoolError, match=r"^all 3 run\(s\) failed: ValueError: no such backbone x$"):
        run_all(_refuse, ["bad"] * 3, ["a", "b", "c"])
    with pytest.raises(PoolError) as e:  # different errors, none finished: each is named, nothing claimed kept
        run_all(_refuse, ["bad", "bad2"], ["a", "b"])
    assert "2 run(s) failed (none finished)" in str(e.value) and "b: ValueError: no such backbone 2" in str(e.value)
    with pytest.raises(PoolError, match="1 run\\(s\\) failed \\(the others finished and are kept\\)"):
        run_all(_refuse, ["ok", "bad"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.integration  # spawns worker processes
def test_a_killed_pool_worker_costs_only_its_own_run():
    from continual.studies.pool import PoolError, run_all
    from pool_jobs import die_or_wait

    finished = []
    with pytest.raises(PoolError) as e:
        run_all(die_or_wait, ["a", "die", "b"], ["a", "die", "b"], workers=2, done=lambda k, v: finished.append(k))
    assert list(e.value.failures) == ["die"] and "died twice" in e.value.failures["die"]
    assert sorted(finished) == ["a", "b"]  # formerly BrokenProcessPool for the runs sharing its pool


def test_generative_lengths_that_cannot_hold_an_answer_are_refused_and_cuts_are_reported(word_tokenizer, lm_model,
                                                                                         tmp_path, capsys):
    from datasets import Dataset

    from conftest import toy_generative_stream
    from continual.training import answers_cut, prompts_cut, tokenize

    ds = Dataset.from_dict({"text": ["what is it ?"] * 3, "target": ["yes", "a very long answer " * 20, "no"]})
    with pytest.raises(ValueError, match="max_length 1 leaves a generative task's answer no token"):
        tokenize(ds, word_tokenizer, 1, "exact")
    assert answers_cut(tokenize(ds, word_tokenizer, 16, "rouge_l")) == 1  # 80 words in 7 answer tokens
    assert prompts_cut(tokenize(ds, word_tokenizer, 16, "rouge_l")) == 0  # 4 prompt words fit beside each answer
    assert prompts_cut(tokenize(ds, word_tokenizer, 6, "rouge_l")) == 1  # 4 prompt tokens fit beside "yes" + eos, not 2 + eos
    assert prompts_cut(tokenize(ds, word_tokenizer, 4, "rouge_l")) == 3  # 2 tokens left for each prompt
    # an encoder-decoder's prompt is the encoder's alone: cut only past max_length itself
    assert prompts_cut(tokenize(ds, word_tokenizer, 4, "rouge_l", decoder_start=0)) == 0
    assert prompts_cut(tokenize(ds, word_tokenizer, 3, "rouge_l", decoder_start=0)) == 3
    with pytest.raises(ValueError, match="max_length 3 leaves"):  # refused before anything is written
        run_stream(toy_generative_stream(), lm_model(), make_strategy("per-task", ["lora"]),
                   TrainConfig(**{**FAST, "max_length": 3}), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    stream = toy_generative_stream()
    stream.tasks[0].test = stream.tasks[0].test.map(lambda r: {"target": r["target"] + " and much more" * 10})
    run_stream(stream, lm_model(), make_strategy("per-task", ["lora"]), TrainConfig(**{**FAST, "max_steps": 2}), tmp_path / "p")
    err = capsys.readouterr()
    assert f"task {stream.tasks[0].name}: 0 of " in err.out + err.err and "test answers are longer than" in err.out + err.err
    # a prompt that loses its start is said too (at 32 tokens the toy prompts fit; b's test ones are made longer)
    stream = toy_generative_stream()
    stream.tasks[1].test = stream.tasks[1].test.map(lambda r: {"text": "apple river " * 20 + r["text"]})
    run_stream(stream, lm_model(), make_strategy("per-task", ["lora"]), TrainConfig(**{**FAST, "max_steps": 2, "max_length": 32}),
               tmp_path / "q")
    said = "".join(capsys.readouterr())
    n = len(stream.tasks[1].test)
    assert f"task b: 0 of {len(stream.tasks[1].train)} training and {n} of {n} test prompts are longer than max_length 32" in said
    assert "lose their start" in said and "task a: " not in said and "task c: " not in said


@pytest.mark.integration  # sockets and MLflow's HTTP client
def test_report_and_sync_against_a_store_that_cannot_be_used_is_one_line(tmp_path, capsys, monkeypatch):
    import socket
    import time

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)  # restored after the test: check_uri sets them
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections, never answers
    port = silent.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()
    cases = [(["report", "some-run-id", "--tracking-uri", f"http://127.0.0.1:{refused}"], "connection refused"),
             (["report", "some-run-id", "--tracking-uri", f"http://127.0.0.1:{port}"], "does not answer"),
             (["report", "some-run-id", "--tracking-uri", f"file:{tmp_path / 'mlruns'}"], "refuses file stores")]
    try:
        for argv, message in cases:
            start = time.monotonic()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert time.monotonic() - start < 60
    finally:
        silent.close()


def test_a_full_disk_while_saving_state_keeps_the_last_state(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import continual.rundir as rundir

    path = tmp_path / "state-step0.safetensors"
    rundir.save_tensors({"x": torch.ones(2)}, path)
    before = path.read_bytes()

    def full(tensors, filename):  # what safetensors raises when the device is full
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(rundir, "save_file", full)
    with pytest.raises(RunStateError, match="cannot write .*StorageFull.*last complete state is kept"):
        rundir.save_tensors({"x": torch.zeros(2)}, path)
    assert path.read_bytes() == before and not path.with_name(path.name + ".tmp").exists()
