"""CODA-Prompt on a tiny BERT: the weighted sum of components by the paper's equation, each task's
components set up orthogonal to the earlier ones and the earlier ones held, the orthogonality
penalty, refusals before anything runs, kill + resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, toy_stream
from continual import StreamLogger, TrainConfig, make_strategy, run_stream
from continual.strategies import SHARED
from continual.strategies.coda_prompt import ortho_penalty
from adapters import ConfigError
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
POOL = [{"method": "coda_prompt", "pool_size": 6, "prompt_length": 2, "tasks": 3}]
TEXTS = ["apple river music", "stone apple cloud", "music tree", "cloud cloud river stone"]


def pool_of(model):
    return model.task(SHARED).deltas["coda_prompt"]


def test_the_prompt_is_the_attention_weighted_sum_of_components(text_model):
    model = text_model()
    model.add_task(SHARED, POOL)
    pool = pool_of(model)
    pool.begin_task(1)
    q = torch.randn(3, model.backbone.config.hidden_size)
    alpha, prompt = pool.mix(q)
    keys, att = torch.cat(list(pool.keys)), torch.cat(list(pool.attention))
    comps = torch.cat(list(pool.components))
    for b in range(3):
        for m in range(6):  # α_m = cos(q ⊙ A_m, K_m); task 2's components are still zero: α = 0
            want = float(F.cosine_similarity(q[b] * att[m], keys[m], dim=0)) if m < 4 else 0.0
            assert abs(float(alpha[b, m]) - want) < 1e-5
        torch.testing.assert_close(prompt[b], sum(alpha[b, m] * comps[m] for m in range(6)))
    assert not torch.equal(alpha[0], alpha[1])  # the weights follow the input


def test_each_task_starts_orthogonal_to_the_earlier_ones(text_model):
    model = text_model()
    model.add_task(SHARED, POOL)
    pool = pool_of(model)
    for t in (1, 2):
        pool.begin_task(t)
    for kind in ("components", "keys", "attention"):
        rows = torch.cat([c.detach().reshape(2, -1) for c in getattr(pool, kind)])
        gram = F.normalize(rows, dim=1) @ F.normalize(rows, dim=1).t()
        torch.testing.assert_close(gram, torch.eye(6), atol=1e-5, rtol=0)
        assert float(ortho_penalty(rows)) < 1e-8
    # components at the embeddings' scale: each token row's norm is the table's mean row norm on average
    norms = torch.cat(list(pool.components)).detach().norm(dim=-1)
    assert abs(float(norms.pow(2).mean().sqrt()) - pool.row_norm) < 1e-4 * pool.row_norm
    with pytest.raises(ConfigError, match="components for 3 tasks"):
        pool.begin_task(3)


class Chunks(StreamLogger):
    """The pool's parameters after each row."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        self.rows.append({n: p.detach().clone() for n, p in pool_of(self.model).named_parameters()})


def test_a_task_trains_its_own_components_and_the_earlier_ones_stay(text_model, tmp_path):
    model = text_model()
    chunks = Chunks(model)
    strategy = make_strategy("coda-prompt", POOL)
    res = run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / "r", loggers=[chunks])
    assert [n for n in model.tasks if model.task(n).deltas] == [SHARED]
    assert not np.isnan(res.matrix.A[-1]).any() and 0 <= res.metrics["ACC_agnostic"] <= 1
    after = chunks.rows
    for t in range(3):
        for kind in ("components", "keys", "attention"):
            name = f"{kind}.{t}"
            assert all(torch.equal(after[r][name], after[t][name]) for r in range(t, 3)), name  # held after its task
            if t:  # not set up before its task started
                assert not after[t - 1][name].any(), name
    # trained, not only set up: the keys moved from their orthogonal start
    assert float(ortho_penalty(torch.cat(list(pool_of(model).keys)).detach())) > 1e-4
    assert strategy.trainable_parameters(model, toy_stream().tasks[2]) == 2 * (2 * 32 + 2 * 32) + model.task("c").head_parameters()


def test_the_orthogonality_penalty_keeps_the_rows_apart(text_model, tmp_path):
    def penalty(ortho_lambda):
        model = text_model()
        stream = TaskStream("two", toy_stream().tasks[:2])
        run_stream(stream, model, make_strategy("coda-prompt", POOL, ortho_lambda=ortho_lambda), CONFIG,
                   tmp_path / str(ortho_lambda))
        pool = pool_of(model)
        return sum(float(ortho_penalty(torch.cat(list(getattr(pool, k))[:2]).detach())) for k in ("components", "keys", "attention"))

    free, held = penalty(0.0), penalty(10.0)
    assert held < 0.5 * free, (held, free)


def test_refusals_come_before_anything_runs(text_model, tmp_path):
    with pytest.raises(ValueError, match="ortho_lambda"):
        make_strategy("coda-prompt", POOL, ortho_lambda=-1)
    short = make_strategy("coda-prompt", [{**POOL[0], "pool_size": 4, "tasks": 2}])
    with pytest.raises(ValueError, match="split for 2 tasks and the stream has 3; give --method coda_prompt:pool_size=6,tasks=3 "):
        run_stream(toy_stream(), text_model(), short, CONFIG, tmp_path / "short")
    assert not (tmp_path / "short").exists()
    with pytest.raises(ConfigError, match="multiple of tasks"):
        make_strategy("coda-prompt", [{**POOL[0], "pool_size": 7}])
    with pytest.raises(ConfigError, match="exceeds the hidden size 32"):
        text_model().add_task("t", [{"method": "coda_prompt"}], num_labels=2)  # the paper's 100 on a 32-wide model
