"""progressive-prompts on a tiny BERT: earlier prompts bit-identical after a new task (BWT exactly 0),
the chain's order, refusals, and a kill + resume equal to the uninterrupted run."""

import pytest
import torch

from conftest import FAST, assert_same_matrices, killed_and_resumed, toy_stream
from continual import StreamLogger, TrainConfig, make_strategy, run_stream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
PROMPT = [{"method": "prompt", "num_tokens": 4}]


class Snapshots(StreamLogger):
    """Every task's prompt after each row."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self.rows.append({n: t.deltas["prompt"].prompt.detach().clone() for n, t in self.model.tasks.items()})


def test_earlier_prompts_stay_bit_identical_and_nothing_is_forgotten(text_model, tmp_path):
    model = text_model()
    snaps = Snapshots(model)
    strategy = make_strategy("progressive-prompts", PROMPT)
    res = run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / "r", loggers=[snaps])
    for row in range(1, 3):
        for name, prompt in snaps.rows[row - 1].items():
            assert torch.equal(snaps.rows[row][name], prompt), (row, name)
    assert res.metrics["BWT"] == 0.0 and res.metrics["forgetting"] == 0.0
    assert strategy.active("a") == ("a",) and strategy.active("c") == ("a", "b", "c")
    # task c's input carries all three prompts, its own in front
    batch = model.tokenizer(["apple river"], return_tensors="pt")
    with model.using(*strategy.active("c")):
        embeds, mask, _, added = model.transform_inputs(batch["input_ids"], batch["attention_mask"], {})
    assert added == 12 and mask.shape[1] == batch["input_ids"].shape[1] + 12
    assert torch.equal(embeds[0, :4], model.task("c").deltas["prompt"].prompt)
    assert torch.equal(embeds[0, 8:12], model.task("a").deltas["prompt"].prompt)


def test_refuses_methods_that_are_not_prompts_and_streams_too_long(text_model, tmp_path):
    with pytest.raises(ValueError, match="must prepend to the input"):
        make_strategy("progressive-prompts", ["lora"])
    long = make_strategy("progressive-prompts", [{"method": "prompt", "num_tokens": 20}])
    with pytest.raises(ValueError, match="3 tasks x 20 prompt tokens"):  # the tiny BERT has 64 positions
        run_stream(toy_stream(), text_model(), long, CONFIG, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_kill_and_resume_equal_the_uninterrupted_run(text_model, tmp_path):
    go = lambda d, **kw: run_stream(toy_stream(), text_model(), make_strategy("progressive-prompts", PROMPT), CONFIG,  # noqa: E731
                                    tmp_path / d, **kw)
    full, resumed = killed_and_resumed(go)
    assert_same_matrices(resumed, full)
