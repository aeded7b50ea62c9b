"""The prompt pool (L2P) on a tiny BERT: selection deterministic and per input, keys moving toward
the queries that select them, the pool shared with no task id, refusals, kill + resume."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import StreamLogger, TrainConfig, make_strategy, run_stream
from continual.scheduler import task_seed
from continual.strategies import SHARED
from adapters.methods.prompt_pool import select
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
POOL = [{"method": "prompt_pool", "pool_size": 6, "prompt_length": 2, "top_k": 2}]
TEXTS = ["apple river music", "stone apple cloud", "music tree", "cloud cloud river stone"]


def test_selection_takes_the_most_similar_keys_and_breaks_ties_by_index():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    idx, sim = select(torch.tensor([[2.0, 0.1], [-1.0, 0.0]]), keys, 2)
    assert idx.tolist() == [[0, 2], [3, 1]]  # keys 0 and 2 are equal: the lower index first
    assert torch.allclose(sim[0], torch.full((2,), float(torch.nn.functional.cosine_similarity(
        torch.tensor([2.0, 0.1]), torch.tensor([1.0, 0.0]), dim=0))))


class Keys(StreamLogger):
    """The pool's keys, and the mean query of each task's training texts, after each row."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self.rows.append(self.model.task(SHARED).deltas["prompt_pool"].keys.detach().clone())


def queries(model, texts):
    pool = model.task(SHARED).deltas["prompt_pool"]
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    embeds = model.backbone.get_input_embeddings()(batch["input_ids"])
    return pool.query(embeds, batch["attention_mask"], {"token_type_ids": batch["token_type_ids"]})


def test_selection_is_deterministic_per_input_and_the_keys_move_toward_their_queries(text_model, tmp_path):
    model = text_model()
    keys = Keys(model)
    strategy = make_strategy("prompt-pool", POOL, pull_lambda=1.0)
    task_a = toy_stream().tasks[0]
    fresh = text_model()  # the keys before training: the scheduler seeds task 0's parameters with task_seed(0, 0)
    torch.manual_seed(task_seed(0, 0))
    make_strategy("prompt-pool", POOL).prepare(fresh, task_a)
    before = fresh.task(SHARED).deltas["prompt_pool"].keys.detach().clone()
    run_stream(TaskStream("one", [task_a]), model, strategy, CONFIG, tmp_path / "r", loggers=[keys])
    pool = model.task(SHARED).deltas["prompt_pool"]
    q = queries(model, list(task_a.train["text"][:64]))
    chosen, _ = select(q, pool.keys, 2)
    used = sorted(set(chosen.flatten().tolist()))

    def closeness(k):  # mean cosine of each used key to the queries that select it
        return float(np.mean([torch.nn.functional.cosine_similarity(q[(chosen == i).any(1)], k[i].unsqueeze(0)).mean()
                              for i in used]))

    assert closeness(keys.rows[-1]) > closeness(before) + 0.05, (closeness(before), closeness(keys.rows[-1]))
    # deterministic and per input: the same texts select the same prompts, alone or in a batch
    with torch.no_grad(), model.acting(*strategy.active("a")):
        batch = model.tokenizer(TEXTS, return_tensors="pt", padding=True)
        model(**batch)
        together = pool.selected.clone()
        for i, text in enumerate(TEXTS):
            model(**model.tokenizer([text], return_tensors="pt"))
            assert torch.equal(pool.selected[0], together[i])
        model(**batch)
        assert torch.equal(pool.selected, together)


def test_one_pool_serves_every_task_and_refusals(text_model, tmp_path):
    model = text_model()
    res = run_stream(toy_stream(), model, make_strategy("prompt-pool", POOL), CONFIG, tmp_path / "r")
    assert [n for n in model.tasks if model.task(n).deltas] == [SHARED]
    assert not np.isnan(res.matrix.A[-1]).any() and 0 <= res.metrics["ACC_agnostic"] <= 1
    with pytest.raises(ValueError, match="pull_lambda"):
        make_strategy("prompt-pool", POOL, pull_lambda=-1)
    big = make_strategy("prompt-pool", [{"method": "prompt_pool", "pool_size": 10, "prompt_length": 10, "top_k": 5}])
    with pytest.raises(ValueError, match="exceeds the 64 positions"):
        run_stream(toy_stream(), text_model(), big, CONFIG, tmp_path / "big")
    assert not (tmp_path / "big").exists()
