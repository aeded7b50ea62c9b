"""Avalanche baselines (the [avalanche] extra): the torchvision workaround, the stream exported as an
Avalanche benchmark, each Avalanche strategy run by our scheduler and scored by our metrics, and
resume after a kill retracing the uninterrupted run (plugin memories included)."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import MLflowLogger, TrainConfig, make_strategy, run_stream
from test_cli import toy_yaml  # noqa: F401  (a fixture)
from test_runner import Recorder

ROOT = Path(__file__).resolve().parents[1]
needs_avalanche = pytest.mark.skipif(importlib.util.find_spec("avalanche") is None,
                                     reason="the [avalanche] extra is not installed (bash scripts/install.sh --avalanche)")
CONFIG = TrainConfig(**FAST)
STATEFUL = ["avalanche-ewc", "avalanche-lwf", "avalanche-replay", "avalanche-agem"]


def run(text_model, tmp_path, name, out="run", **kw):
    return run_stream(toy_stream(), text_model(), make_strategy(name, backbone_lr=1e-2), CONFIG, tmp_path / out, **kw)


def test_core_install_has_no_torchvision_and_the_extra_pins_avalanche():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("torchvision" in d or "avalanche" in d for d in meta["dependencies"])
    assert meta["optional-dependencies"]["avalanche"] == ["avalanche-lib==0.6.0"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_and_transformers_import_after_adapters():
    # a fresh interpreter: the order of imports is the point
    code = ("import adapters, adapters.torchvision_compat as tc, torchvision, transformers\n"
            "from transformers import BertModel\n"
            "import torch; print(tc.patched, torch.ops.torchvision.nms is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    patched, _ = out.stdout.split()
    # the workaround is used exactly when torchvision's own C extension cannot load
    ext = subprocess.run([sys.executable, "-c", "import torchvision.extension as e; print(e._has_ops())"],
                         capture_output=True, text=True, timeout=300)
    if ext.returncode == 0:  # loads by itself: nothing was patched
        assert patched == "False" and ext.stdout.strip() == "True"
    else:
        assert patched == "True" and "torchvision::nms does not exist" in ext.stderr


@needs_avalanche
def test_stream_exports_as_a_task_incremental_benchmark(minilm_tokenizer):
    from continual.strategies.avalanche import avalanche_benchmark

    stream = toy_stream()
    bm = avalanche_benchmark(stream, minilm_tokenizer, max_length=16)
    assert len(bm.train_stream) == len(bm.valid_stream) == len(bm.test_stream) == 3
    for j, (exp, task) in enumerate(zip(bm.test_stream, stream)):
        assert exp.task_label == j and exp.current_experience == j
        assert len(exp.dataset) == len(task.test)
        x, y, t = exp.dataset[0]
        assert x.dtype == torch.long and x.shape == (3, 512) and t == j and y == task.test["label"][0]
        ids = minilm_tokenizer(task.test["text"][0], truncation=True, max_length=16)["input_ids"]
        assert x[0, :len(ids)].tolist() == ids and x[1].sum() == len(ids)  # ids, then the mask
        assert set(exp.classes_in_this_experience) == set(task.test["label"])


def check_run(res, tmp_path, out, reference_params):
    """What every Avalanche strategy's run must show: our matrix and metrics, our step budget,
    the backbone counted as trained, and the fine-tuned backbone saved with the heads."""
    R = res.matrix.R
    assert not np.isnan(np.tril(R)).any() and R[0, 0] >= 0.9  # the first toy task is learned
    assert all(np.isfinite(res.metrics[k]) for k in ("ACC", "BWT", "FWT", "forgetting"))
    assert [s["steps"] for s in res.steps] == [CONFIG.max_steps] * 3  # our protocol's step budget
    assert res.steps[2]["trainable_params"]["c"] > reference_params
    ck = tmp_path / out / "checkpoints"
    assert (ck / "backbone.safetensors").exists() and {p.name for p in ck.iterdir() if p.is_dir()} == {"a", "b", "c"}


@needs_avalanche
def test_naive_runs_the_stream_with_our_metrics(text_model, tmp_path):
    check_run(run(text_model, tmp_path, "avalanche-naive"), tmp_path, "run", text_model().backbone_parameters())


@needs_avalanche
@pytest.mark.parametrize("name", ["avalanche-replay", "avalanche-agem"])
def test_memories_mix_tasks_of_different_lengths(text_model, tmp_path, name):
    from datasets import Dataset
    from streams import Task, TaskStream

    short, long_ = toy_stream()[0], toy_stream()[1]
    longer = lambda ds: Dataset.from_dict({"text": [t + " " + t for t in ds["text"]], "label": ds["label"]})  # noqa: E731
    long_ = Task("b", longer(long_.train), longer(long_.dev), longer(long_.test), long_.label_names)
    stream = TaskStream("lengths", [short, long_])
    # memory batches hold task a's short rows next to task b's long ones
    res = run_stream(stream, text_model(), make_strategy(name, backbone_lr=1e-2), CONFIG, tmp_path / "r")
    assert np.isfinite(res.metrics["ACC"])


@needs_avalanche
def test_replay_and_lwf_forget_less_than_naive(text_model, tmp_path):
    naive = run(text_model, tmp_path, "avalanche-naive", "naive").metrics["forgetting"]
    for name in ("avalanche-replay", "avalanche-lwf"):
        assert run(text_model, tmp_path, name, name).metrics["forgetting"] < naive, name


@needs_avalanche
# A-GEM in the default suite; the other three (same code path, another plugin) with -m slow
@pytest.mark.parametrize("name", [n if n == "avalanche-agem" else pytest.param(n, marks=pytest.mark.slow) for n in STATEFUL])
def test_each_strategy_runs_and_resumes_after_a_kill_retracing_the_run(text_model, tmp_path, name):
    full = run(text_model, tmp_path, name, "full")
    check_run(full, tmp_path, "full", text_model().backbone_parameters())
    with pytest.raises(KeyboardInterrupt):
        run(text_model, tmp_path, name, "killed", loggers=[Recorder(kill_at_row=2)])
    again = Recorder()
    resumed = run(text_model, tmp_path, name, "killed", loggers=[again], resume=True)
    assert again.rows == [2]
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)
    np.testing.assert_array_equal(resumed.matrix.F1, full.matrix.F1)


@needs_avalanche
def test_avalanche_run_is_logged_to_mlflow(text_model, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run(text_model, tmp_path, "avalanche-ewc", loggers=[MLflowLogger(uri, "t", "ewc-run")])
    parent = MlflowClient(uri).get_run(res.tracking["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["strategy.avalanche"] == "EWC" and parent.data.params["strategy.options.mode"] == "online"
    assert parent.data.metrics["ACC"] == pytest.approx(res.metrics["ACC"])


@needs_avalanche
def test_bad_strategy_options_are_refused():
    with pytest.raises(ValueError, match="unknown option.*ewc_lambda"):
        make_strategy("avalanche-ewc", lambda_=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ewc_lambda'\]; its options: none"):
        make_strategy("per-task", ["lora"], ewc_lambda=3)
    # values Avalanche takes and then trains on silently (exit 0) or fails on mid-run
    bad = {("avalanche-ewc", "ewc_lambda", -1): "ewc_lambda must be a finite number >= 0",
           ("avalanche-ewc", "decay_factor", float("nan")): "decay_factor must be a number in [0, 1]",
           ("avalanche-ewc", "mode", "bogus"): "mode must be 'online' or 'separate'",
           ("avalanche-lwf", "temperature", 0): "temperature must be a finite number >= 1e-06",
           ("avalanche-lwf", "alpha", -1.0): "alpha must be a finite number >= 0",
           ("avalanche-replay", "mem_size", 0): "mem_size must be an integer >= 1",
           ("avalanche-replay", "mem_size", "abc"): "mem_size must be an integer >= 1",
           ("avalanche-agem", "patterns_per_exp", 0): "patterns_per_exp must be an integer >= 1",
           ("avalanche-agem", "sample_size", 2.5): "sample_size must be an integer >= 1"}
    for (name, key, value), message in bad.items():
        with pytest.raises(ValueError) as err:
            make_strategy(name, **{key: value})
        assert message in str(err.value), (name, key, value)
    with pytest.raises(ValueError, match="decay_factor applies to mode=online only"):
        make_strategy("avalanche-ewc", mode="separate", decay_factor=0.5)
    assert make_strategy("avalanche-ewc", mode="separate").options["decay_factor"] is None  # what Avalanche needs there
    stream = toy_stream()  # 3 tasks
    with pytest.raises(ValueError, match="sample_size 1 is smaller than the 2 earlier tasks"):
        make_strategy("avalanche-agem", sample_size=1).check_stream(stream, None)


@needs_avalanche
def test_cli_runs_and_compares_avalanche_baselines(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    import json

    from continual.cli import main
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--stream", str(toy_yaml), "--backbone", str(tiny_backbone_dir), "--steps", "20", "--eval-every", "10",
              "--max-length", "16", "--no-progress", "--tracking-uri", uri]
    out = tmp_path / "replay"
    assert main(["run", "--strategy", "avalanche-replay", "--strategy-option", "mem_size=30", "--out", str(out), *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identity"]["strategy"]["options"] == {"mem_size": 30}
    assert main(["run", "--strategy", "avalanche-replay", "--strategy-option", "mem_sise=30", "--out", str(tmp_path / "x"),
                 *common]) == 2
    assert "unknown option(s) ['mem_sise']" in capsys.readouterr().err
    cmp = tmp_path / "cmp"
    assert main(["compare", "--entry", "avalanche-ewc@ewc_lambda=10", "--out", str(cmp), *common]) == 0
    rows = json.loads((cmp / "report.json").read_text())["rows"]
    assert list(rows) == ["avalanche-ewc@ewc_lambda=10"]
    own = json.loads((cmp / "avalanche-ewc@ewc_lambda=10" / "results.json").read_text())
    assert own["identity"]["strategy"]["options"]["ewc_lambda"] == 10
    assert rows["avalanche-ewc@ewc_lambda=10"]["ACC"] == own["metrics"]["ACC"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("continual").experiment_id
    assert client.search_runs([exp], "attributes.run_name = 'compare-toy-avalanche-ewc@ewc_lambda=10'")


def test_without_the_extra_the_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "avalanche" else real(name, *a))
    with pytest.raises(ImportError, match=r"install.sh --avalanche"):
        make_strategy("avalanche-lwf")
