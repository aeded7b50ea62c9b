"""The perplexity router (AdapterCL's selection): surprise scores, routing by them, in a run and in route."""

import math

import numpy as np
import pytest
import torch

from conftest import FAST, assert_same_matrices, killed_and_resumed, tiny_t5, toy_generative_stream, toy_stream
from continual import TrainConfig, eval_loader, make_strategy, run_stream
from continual.training.data import GenerationLoader, tokenize
from fusion.perplexity import PerplexityRouter, surprise


def test_the_router_sends_each_example_to_its_least_surprised_task():
    r = PerplexityRouter()
    with pytest.raises(ValueError, match="no tasks yet"):
        r.predict(torch.zeros(2, 1))
    r.add_task("a")
    r.add_task("b", torch.zeros(3, 4), [0, 1, 0])  # embeddings, if given, are not read
    with pytest.raises(ValueError, match="already in the router"):
        r.add_task("a")
    assert r.predict(torch.tensor([[0.2, 0.9], [1.5, 0.1], [0.3, 0.3]])).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"one column per task, got shape \(3, 3\)"):
        r.predict(torch.zeros(3, 3))


def test_the_router_refuses_what_it_cannot_compare():
    assert PerplexityRouter.refusal([False, False], encoder_decoder=False) is None
    assert PerplexityRouter.refusal([True, True], encoder_decoder=False) is None
    assert PerplexityRouter.refusal([False], encoder_decoder=True) is None  # T5 classifiers: heads' entropies
    assert "mixes both kinds" in PerplexityRouter.refusal([False, True], encoder_decoder=False)
    assert "encoder-decoder" in PerplexityRouter.refusal([True], encoder_decoder=True)


def test_a_classifiers_surprise_is_its_normalised_entropy(text_model):
    model = text_model()
    model.add_task("x", [{"method": "lora", "rank": 2}], num_labels=3)
    loader = eval_loader(toy_stream()["a"].test.select(range(6)), model.tokenizer, 16, 4)
    got = surprise(model, loader, ("x",))
    with torch.no_grad(), model.using("x"):
        p = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).softmax(-1) for b in loader])
    np.testing.assert_allclose(got.numpy(), (-(p * p.log()).sum(-1) / math.log(3)).numpy(), rtol=1e-5)
    with torch.no_grad():
        for p in model.task("x").head.parameters():
            p.zero_()  # equal logits: uniform, the most surprised a head can be
    np.testing.assert_allclose(surprise(model, loader, ("x",)).numpy(), 1.0, rtol=1e-6)


def test_a_prompts_surprise_is_its_own_perplexity_whatever_pads_it(lm_model):
    """Prompts batched for generation are left-padded; each one's score is the mean next-token
    negative log-likelihood of the prompt read alone (the padding moved out of its positions)."""
    model = lm_model()
    model.add_task("g", [{"method": "lora", "rank": 2}], generative=True)
    task = toy_generative_stream()["a"]
    data = tokenize(task.test.select(range(5)), model.tokenizer, 48, task.metric)
    together = surprise(model, GenerationLoader(data, model.tokenizer, 5), ("g",))
    lengths = data["prompt_len"]
    assert len(set(lengths)) > 1  # the batch is padded
    for i, n in enumerate(lengths):
        ids = torch.tensor([data[i]["input_ids"][:n]])
        with torch.no_grad(), model.using("g"):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).float()
        alone = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        assert together[i].item() == pytest.approx(alone.item(), rel=1e-4)


def _run(model, stream, out, **kw):
    return run_stream(stream, model, make_strategy("per-task", [{"method": "lora", "rank": 4}]),
                      TrainConfig(**FAST, router="perplexity"), out, **kw)


def test_a_run_routes_by_its_deltas_surprise_and_resumes_to_the_same_matrices(text_model, tmp_path):
    stream = toy_stream()
    model = text_model()
    result = _run(model, stream, tmp_path / "one")
    # the last row by hand: every test example to the task whose delta and head are least unsure of it
    routed = right = 0
    for j, t in enumerate(stream):
        loader = eval_loader(t.test, model.tokenizer, FAST.get("max_length", 64), 64)
        pick = torch.stack([surprise(model, loader, (k.name,)) for k in stream], 1).argmin(1)
        right, routed = right + int((pick == j).sum()), routed + len(pick)
    assert result.matrix.routing[-1] == pytest.approx(right / routed)
    assert not np.isnan(result.matrix.A[-1]).any() and result.matrix.routing[0] == 1.0  # one task: nowhere else to go
    full, resumed = killed_and_resumed(lambda d, **kw: _run(text_model(), stream, tmp_path / d, **kw))
    assert_same_matrices(full, resumed)


def test_runs_the_router_cannot_compare_are_refused_before_training(lm_model, word_tokenizer, tmp_path):
    from streams import TaskStream

    mixed = TaskStream("mixed", [toy_stream()["a"], toy_generative_stream()["b"]])
    with pytest.raises(ValueError, match="mixes both kinds.*choose another router"):
        _run(lm_model(), mixed, tmp_path / "m")
    with pytest.raises(ValueError, match="encoder-decoder"):
        _run(tiny_t5(word_tokenizer), toy_generative_stream(), tmp_path / "t5")
    assert not (tmp_path / "m").exists() and not (tmp_path / "t5").exists()
