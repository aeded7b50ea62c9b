"""Combining methods on one task: simultaneous vs sequential (earlier deltas frozen), and the CLI study."""

import json

import pytest
import torch

from conftest import FAST, toy_task
from continual import TrainConfig
from continual.cli import main
from continual.studies.combine import train_combination


def test_sequential_freezes_the_earlier_delta(text_model):
    model = text_model()
    task = toy_task("a", "apple", 1)
    seen = {}
    orig = model.add_task

    def spy(name, *a, **kw):  # the first stage's delta, right after stage 2 is added
        out = orig(name, *a, **kw)
        if name == "combo-2":
            seen["lora"] = {k: v.clone() for k, v in model.task("combo").state_dict().items()}
        return out

    model.add_task = spy
    r = train_combination(model, "combo", task.splits(), [{"method": "lora", "rank": 4}, "bitfit"], "sequential",
                          task.label_names, TrainConfig(**FAST))
    assert [s["methods"] for s in r.stages] == [["lora(rank=4)"], ["bitfit"]]
    for k, v in model.task("combo").state_dict().items():  # stage 2 left stage 1 untouched
        assert torch.equal(v, seen["lora"][k]), k
    assert r.test_accuracy == r.stages[-1]["test_accuracy"] and r.test_accuracy >= 0.8
    assert r.trainable_params == sum(s["trainable_params"] for s in r.stages)
    with model.using("combo", "combo-2"):  # both deltas act, the last head answers
        assert model.active_deltas() == [*model.task("combo").deltas.values(), *model.task("combo-2").deltas.values()]


def test_simultaneous_is_one_task(text_model):
    model = text_model()
    task = toy_task("a", "apple", 1)
    r = train_combination(model, "c", task.splits(), ["lora", "bitfit"], "simultaneous", task.label_names, TrainConfig(**FAST))
    assert list(model.tasks) == ["c"] and list(model.task("c").deltas) == ["lora", "bitfit"]
    assert len(r.stages) == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        train_combination(model, "d", task.splits(), ["lora"], "both", task.label_names)


def test_combine_command_runs_a_grid(tiny_backbone_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["combine", "--task", "sms", "--backbone", str(tiny_backbone_dir), "--combo", "lora:rank=2+bitfit",
                 "--combo", "bitfit+prompt:num_tokens=2", "--max-train", "40", "--max-eval", "30", "--steps", "4",
                 "--eval-every", "2", "--max-length", "16", "--out", str(tmp_path / "c"), "--tracking-uri", uri,
                 "--no-progress"])  # it trains with progress bars, so it offers to turn them off as run does
    assert code == 0
    printed, err = capsys.readouterr()
    assert "train combo" not in err
    rows = json.loads((tmp_path / "c" / "combinations.json").read_text())
    # each method with its non-default options: lora:rank=2 and lora:rank=8 rows of one grid differ
    assert [(r["methods"], r["mode"]) for r in rows] == [
        (["lora(rank=2)", "bitfit"], "simultaneous"), (["lora(rank=2)", "bitfit"], "sequential"),
        (["bitfit", "prompt(num_tokens=2)"], "simultaneous"), (["bitfit", "prompt(num_tokens=2)"], "sequential")]
    assert "| lora(rank=2)+bitfit | sequential |" in printed
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("combinations").experiment_id])
    assert len(runs) == 4
    # a combination or a mode given twice trained the same cell twice (two rows of it): refused first
    for twice in (["--combo", "lora", "--combo", "lora"], ["--mode", "sequential", "--mode", "sequential"]):
        assert main(["combine", "--task", "sms", "--backbone", str(tiny_backbone_dir), *twice, "--out",
                     str(tmp_path / "twice"), "--no-mlflow"]) == 2
        assert "given more than once; give each combination and mode once" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_combine_offers_no_router_it_would_ignore(capsys):
    """combine trains one task, so nothing is routed: a --router there would be accepted and do
    nothing, so the command refuses it (run and compare keep it)."""
    with pytest.raises(SystemExit) as e:
        main(["combine", "--router", "linear"])
    assert e.value.code == 2 and "unrecognized arguments: --router" in capsys.readouterr().err
    from continual.cli import build_parser
    assert build_parser().parse_args(["run", "--router", "linear"]).router == "linear"
