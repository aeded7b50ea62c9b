"""mas (Memory Aware Synapses on a shared delta): the importance recomputed by hand, its
independence of the labels (EWC's Fisher depends on them), and the penalty's scale, on a tiny BERT."""

import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy
from continual.scoring import TokenisedTasks
from continual.strategies import SHARED
from continual.training import collate_rows

CONFIG = TrainConfig(**FAST)
LORA = [{"method": "lora", "rank": 4}]


def prepared(text_model, name, **options):
    model, task = text_model(), toy_stream()[0]
    strategy = make_strategy(name, LORA, **options)
    strategy.prepare(model, task)
    model.activate(*strategy.active(task.name))  # as training leaves it
    for p in model.task(SHARED).deltas.parameters():  # LoRA's B starts at 0: move it, so every part has a gradient
        torch.nn.init.normal_(p, std=0.1)
    data = TokenisedTasks(model.tokenizer, CONFIG.max_length, 32)
    return model, task, strategy, data(task)["train"]


def test_importance_is_the_mean_absolute_gradient_of_the_outputs_squared_norm(text_model):
    model, task, mas, train = prepared(text_model, "mas", importance_samples=1000)
    train = train.select(range(20))  # every row of these 20
    omega = mas.estimate_fisher(model, task, train, CONFIG)
    params = dict(model.task(SHARED).deltas.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    with model.acting(SHARED, task.name):
        for i in range(len(train)):
            batch = collate_rows(train, [i], model.tokenizer)
            batch.pop("labels")
            grads = torch.autograd.grad((model(**batch) ** 2).sum(), list(params.values()))
            for k, g in zip(params, grads):
                expected[k] += g.abs() / len(train)
    assert set(omega) == set(expected)
    for k in expected:
        torch.testing.assert_close(omega[k], expected[k], rtol=1e-4, atol=1e-9)
        assert (omega[k] >= 0).all() and omega[k].sum() > 0
    # no label is read: every label flipped, the same importance; EWC's Fisher changes
    flipped = train.map(lambda r: {"label": 1 - r["label"]})
    again = mas.estimate_fisher(model, task, flipped, CONFIG)
    assert all(torch.equal(again[k], omega[k]) for k in omega)
    model2, _, ewc, _ = prepared(text_model, "ewc", fisher_samples=1000)
    fisher, fisher_flipped = (ewc.estimate_fisher(model2, task, d, CONFIG) for d in (train, flipped))
    assert any(not torch.allclose(fisher[k], fisher_flipped[k]) for k in fisher)


def test_penalty_is_lambda_times_the_weighted_squared_move(text_model):
    model, task, mas, train = prepared(text_model, "mas", mas_lambda=3.0, importance_samples=8)
    assert mas.loss_term(model, task, CONFIG, None) is None  # nothing anchored before the first task ends
    params = dict(model.task(SHARED).deltas.named_parameters())
    mas.fisher = {k: torch.rand_like(p) for k, p in params.items()}
    mas.anchor = {k: p.detach().float().clone() for k, p in params.items()}
    term = mas.loss_term(model, task, CONFIG, None)
    assert term(None, None, None).item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05)
    by_hand = sum((mas.fisher[k] * 0.05 ** 2).sum() for k in params) * 3.0
    assert term(None, None, None).item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert mas.describe()["mas_lambda"] == 3.0 and mas.describe()["importance_samples"] == 8
    assert "ewc_lambda" not in mas.describe()


def test_bad_options_are_refused():
    for key, bad, what in (("mas_lambda", -1, "a finite number >= 0"), ("mas_lambda", float("inf"), "a finite number >= 0"),
                           ("importance_samples", 0, "an integer >= 1"), ("importance_samples", 2.5, "an integer >= 1")):
        with pytest.raises(ValueError, match=f"mas: {key} must be {what}"):
            make_strategy("mas", LORA, **{key: bad})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ewc_lambda'\]"):
        make_strategy("mas", LORA, ewc_lambda=1.0)


def test_a_generative_answer_is_measured_per_vocabulary_entry_and_token():
    from continual.strategies.mas import MAS

    logits = torch.randn(2, 4, 50)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, -100, 1]])  # three answer tokens
    rows = torch.stack([logits[0, 1], logits[0, 2], logits[1, 3]])
    assert MAS.objective(logits, labels).item() == pytest.approx(float((rows ** 2).sum() / (3 * 50)), rel=1e-6)
    classifier = torch.randn(1, 3)
    assert MAS.objective(classifier, torch.tensor([1])).item() == pytest.approx(float((classifier ** 2).sum()), rel=1e-6)
