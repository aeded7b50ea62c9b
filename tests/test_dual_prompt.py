"""DualPrompt on a tiny BERT: a training step uses its task's expert prompt and a score lets the
query choose among the keys set up so far, the earlier tasks' expert prompts and keys held while
the general prompt trains on, keys pulled toward their task's queries, refusals, kill + resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, toy_stream
from continual import StreamLogger, TrainConfig, make_strategy, run_stream
from continual.scheduler import task_seed
from continual.strategies import SHARED
from adapters import ConfigError

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
PROMPTS = [{"method": "dual_prompt", "g_length": 2, "e_length": 2, "tasks": 3}]
TEXTS = ["apple river music", "stone apple cloud", "music tree", "cloud cloud river stone"]


def prompts_of(model):
    return model.task(SHARED).deltas["dual_prompt"]


def queries(model, texts):
    prompts = prompts_of(model)
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    embeds = model.backbone.get_input_embeddings()(batch["input_ids"])
    return prompts.query(embeds, batch["attention_mask"], {"token_type_ids": batch["token_type_ids"]})


def test_training_uses_the_tasks_prompt_and_scoring_the_closest_set_up_key(text_model):
    model = text_model()
    model.add_task(SHARED, PROMPTS)
    model.add_task("h", [], num_labels=2)
    prompts = prompts_of(model)
    prompts.begin_task(1)
    q = queries(model, TEXTS)
    with torch.no_grad():  # keys 0 and 1 set up, key 2 zero: never chosen, even where every other is far
        prompts.keys[0].copy_(q[0])
        prompts.keys[1].copy_(-q[0])
    chosen = prompts.choose(q)
    sims = F.normalize(q, dim=-1) @ F.normalize(torch.stack([prompts.keys[0], prompts.keys[1]]).detach(), dim=-1).t()
    assert chosen.tolist() == sims.argmax(1).tolist() and chosen[0] == 0
    with torch.no_grad():
        prompts.keys[0].copy_(-q.mean(0))
        prompts.keys[1].copy_(-q.mean(0) * 2)
    assert prompts.choose(q).tolist() == [0] * 4  # every set-up key has cos < 0; key 2 (cos 0) is not chosen
    batch = model.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with model.acting(SHARED, "h"):
        with torch.no_grad():
            model(**batch)
        assert prompts.selected.tolist() == [0] * 4
        model(**batch)  # with gradients: a training step on task 1 (begin_task(1) made it current)
        assert prompts.selected.tolist() == [1] * 4
        want = (1 - F.cosine_similarity(q, prompts.keys[1].detach().unsqueeze(0))).mean()
        torch.testing.assert_close(prompts.pull.detach(), want)


class Params(StreamLogger):
    def __init__(self, model):
        self.model, self.rows = model, []

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self.rows.append({n: p.detach().clone() for n, p in prompts_of(self.model).named_parameters()})


def test_earlier_experts_are_held_the_general_prompt_trains_on_and_keys_move_to_their_queries(text_model, tmp_path):
    model = text_model()
    seen = Params(model)
    stream = toy_stream()
    fresh = text_model()  # the keys before training: the scheduler seeds task t's parameters with task_seed(0, t)
    strategy = make_strategy("dual-prompt", PROMPTS)
    for j, task in enumerate(stream.tasks):
        torch.manual_seed(task_seed(0, j))
        strategy.prepare(fresh, task)
    before = [prompts_of(fresh).keys[t].detach().clone() for t in range(3)]
    res = run_stream(stream, model, make_strategy("dual-prompt", PROMPTS), CONFIG, tmp_path / "r", loggers=[seen])
    assert [n for n in model.tasks if model.task(n).deltas] == [SHARED]
    assert not np.isnan(res.matrix.A[-1]).any() and 0 <= res.metrics["ACC_agnostic"] <= 1
    rows = seen.rows
    for t in range(3):
        for name in (f"expert.{t}", f"keys.{t}"):
            assert all(torch.equal(rows[r][name], rows[t][name]) for r in range(t, 3)), name
        if t:
            assert not torch.equal(rows[t]["general"], rows[t - 1]["general"])  # trained by every task
    for t, task in enumerate(stream.tasks):  # each key closer to its own task's queries than it started
        q = F.normalize(queries(model, list(task.train["text"][:64])), dim=-1).mean(0)
        k = prompts_of(model).keys[t].detach()
        assert float(F.cosine_similarity(q, k, dim=0)) > float(F.cosine_similarity(q, before[t], dim=0)) + 0.05, t


def test_refusals_come_before_anything_runs(text_model, tmp_path):
    with pytest.raises(ValueError, match="pull_lambda"):
        make_strategy("dual-prompt", PROMPTS, pull_lambda=float("nan"))
    short = make_strategy("dual-prompt", [{**PROMPTS[0], "tasks": 2}])
    with pytest.raises(ValueError, match="it has 2 of them .* and the stream has 3 tasks; give --method dual_prompt:tasks=3"):
        run_stream(toy_stream(), text_model(), short, CONFIG, tmp_path / "short")
    assert not (tmp_path / "short").exists()
    with pytest.raises(ConfigError, match="e_length must be >= 1"):
        make_strategy("dual-prompt", [{**PROMPTS[0], "e_length": 0}])
