"""Carried-over scores equal a full re-score; a change anywhere a task's forward pass reads (its
delta, its head, a fusion's source, the backbone) makes it re-scored."""

import numpy as np
import pytest
import torch

import adapters
from conftest import FAST, method_config, tiny_backbone, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.scoring import RowScorer, tasks_read
from fusion import add_fusion

CONFIG = TrainConfig(**{**FAST, "max_steps": 20, "eval_every": 10})


@pytest.mark.parametrize("strategy, carries", [("per-task", True), ("seq-ft", False), ("seq-delta", False)])
def test_carried_scores_equal_a_full_rescore(text_model, tmp_path, strategy, carries):
    methods = None if strategy == "seq-ft" else [{"method": "lora", "rank": 4}]  # seq-ft trains no delta
    make = lambda: make_strategy(strategy, methods)  # noqa: E731
    fast = run_stream(toy_stream(), text_model(), make(), CONFIG, tmp_path / "carry")
    full = run_stream(toy_stream(), text_model(), make(), CONFIG, tmp_path / "full", rescore_all=True)
    np.testing.assert_array_equal(fast.matrix.R, full.matrix.R)
    np.testing.assert_array_equal(fast.matrix.F1, full.matrix.F1)
    assert all(s["carried"] == [] for s in full.steps)
    names = [t.name for t in toy_stream()]
    # per-task: every earlier task is carried; the baselines change old tasks, so nothing is
    expect = [names[:row] if carries else [] for row in range(3)]
    assert [s["carried"] for s in fast.steps] == expect


def scored_model():
    model = adapters.DeltaModel(tiny_backbone("bert"))
    for name in ("a", "b"):
        model.add_task(name, [method_config("lora")], num_labels=2)
    add_fusion(model, "f", ["a", "b"], ["x", "y"])
    calls = []
    scorer = RowScorer(model, lambda t: calls.append(t.name) or {"accuracy": float(len(calls))}, lambda n: (n,))
    return model, scorer, calls


class T:
    def __init__(self, name):
        self.name = name


def test_any_change_a_task_reads_makes_it_rescored():
    model, scorer, calls = scored_model()
    tasks = [T("a"), T("b"), T("f")]
    assert tasks_read(model, ["f"]) == ["a", "b", "f"]
    scorer.row(tasks)
    assert calls == ["a", "b", "f"]
    _, carried = scorer.row(tasks)
    assert carried == ["a", "b", "f"] and len(calls) == 3
    with torch.no_grad():  # the smallest possible change to one of a's LoRA weights
        p = next(model.task("a").deltas.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    _, carried = scorer.row(tasks)
    assert carried == ["b"] and calls[3:] == ["a", "f"]  # f fuses a: re-scored too
    with torch.no_grad():
        model.task("b").head.classifier.bias.add_(1e-3)
    _, carried = scorer.row(tasks)
    assert carried == ["a"] and calls[5:] == ["b", "f"]
    with torch.no_grad():
        model.backbone.embeddings.LayerNorm.weight.mul_(1.001)
    _, carried = scorer.row(tasks)
    assert carried == [] and calls[7:] == ["a", "b", "f"]


def test_test_examples_seen_in_training_are_counted_and_said(minilm_tokenizer, capsys):
    """A test file that is the training file (or duplicates in the data) makes scores measure
    memory: the overlap is counted on the inputs (text and text_pair) and said once per task."""
    from datasets import Dataset

    from continual.scoring import TokenisedTasks
    from conftest import toy_rows
    from streams import Task

    rows = toy_rows("apple", 1)
    ds = lambda rs, pair=None: Dataset.from_dict(  # noqa: E731
        {"text": [r[0] for r in rs], "label": [r[1] for r in rs], **({"text_pair": pair} if pair else {})})
    clean = toy_stream().tasks[0]
    assert clean.seen_in_training() == {"dev": 0, "test": 0}
    leaky = Task("leaky", ds(rows[:80]), ds(rows[:3] + rows[80:97]), ds(rows[:20]), ["no", "yes"])
    assert leaky.seen_in_training() == {"dev": 3, "test": 20}
    # the same text with another second text is another input (an NLI premise with a new hypothesis)
    pairs = Task("pairs", ds(rows[:80], ["h"] * 80), ds(rows[80:100], ["h"] * 20), ds(rows[:20], ["other"] * 20), ["no", "yes"])
    assert pairs.seen_in_training() == {"dev": 0, "test": 0}
    data = TokenisedTasks(minilm_tokenizer, 16, 8)
    data(clean)
    assert "verbatim" not in capsys.readouterr().out
    data(leaky), data(leaky)
    out = capsys.readouterr().out
    assert out.count("task leaky: 3 of 20 dev and 20 of 20 test examples occur verbatim in its training split") == 1
