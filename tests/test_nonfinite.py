"""Outputs that are not finite numbers are refused, not scored: an argmax of NaN logits is label 0
(or token 0), so a diverged, damaged or overflowing delta printed a plausible score with exit 0."""

from __future__ import annotations

import pytest
import torch
from conftest import GEN_TEMPLATE, batch, lora_model, method_config, tiny_backbone

from adapters import DeltaModel, NonFiniteError
from adapters.generation import answer_batches, generate_text
from continual.training import evaluate
from fusion import merge_tasks


def _loader(n_batches: int = 2):
    out = []
    for i in range(n_batches):
        b = batch(seed=i)
        out.append({**b, "labels": torch.tensor([0, 1, 2])})
    return out


def test_a_classifier_with_nan_outputs_is_refused_and_minus_inf_is_not():
    model = lora_model()
    assert 0.0 <= evaluate(model, "t", _loader())["accuracy"] <= 1.0
    with torch.no_grad():
        model.task("t").head.classifier.bias[2] = -float("inf")  # a label masked out: a legal output
    assert evaluate(model, "t", _loader())["accuracy"] <= 2 / 3
    with torch.no_grad():
        next(model.task("t").deltas["lora"].parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"scoring task 't': the outputs of 6 example\(s\) hold NaN or inf"):
        evaluate(model, "t", _loader())


def test_task_arithmetic_that_overflows_is_refused_when_scored():
    """merge_tasks accepts any finite weights; 1e38 times a delta overflows float32 to inf."""
    model = DeltaModel(tiny_backbone("bert"))
    for n in ("a", "b"):
        model.add_task(n, [method_config("bitfit")], num_labels=3)
        with torch.no_grad():
            for p in model.task(n).deltas.parameters():
                p.fill_(0.5)
    merge_tasks(model, "big", ["a", "b"], [3e38, 3e38], head_from="a")
    with pytest.raises(NonFiniteError, match="'big'"):
        evaluate(model, "big", _loader(1))


def test_generation_from_nan_logits_is_refused_after_every_batch_is_answered(lm_model, word_tokenizer):
    model = lm_model()
    model.add_task("g", [method_config("lora")], generative=True)
    model.activate("g")
    prompt = GEN_TEMPLATE.format(text="apple river green")
    assert isinstance(generate_text(model, [prompt])[0], str)
    with torch.no_grad():
        for site in model.task("g").deltas["lora"].site_modules.values():
            site.lora_B.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the outputs of 2 example\(s\)"):
        generate_text(model, [prompt, prompt])
    enc = word_tokenizer([prompt] * 2, return_tensors="pt", padding=True)
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}] * 3
    with pytest.raises(NonFiniteError, match=r"the outputs of 6 example\(s\)") as e:
        answer_batches(model, batches, 3)
    assert e.value.count == 6  # all three batches were answered, then refused together
    assert str(e.value).startswith("greedy decoding: the outputs of 6")  # the message, not a (message, count) tuple


def test_scoring_without_the_task_id_refuses_nan_outputs():
    """The task-agnostic row answers routed examples through another task's delta and head, apart
    from the task-aware scoring that checks its own: NaN there was scored as label 0."""
    from continual.agnostic import _predicted

    model = lora_model()
    assert len(_predicted(model, _loader(), ("t",), "fp32")) == 6
    with torch.no_grad():
        model.task("t").head.classifier.bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"without the task id .*'t'.*6 example\(s\)"):
        _predicted(model, _loader(), ("t",), "fp32")


def test_routing_refuses_nan_embeddings_and_nan_routed_logits(text_model):
    from fusion.routing import PrototypeRouter, RoutingData, embed, route_and_score

    model = text_model()
    for name in ("a", "b"):
        model.add_task(name, [method_config("lora")], num_labels=2, label_names=["no", "yes"])
    enc = dict(model.tokenizer(["apple river", "green music table"], padding=True, return_tensors="pt"))
    eye = torch.eye(2)
    data = lambda: RoutingData(["a", "b"], {n: eye[i].expand(2, -1) for i, n in enumerate("ab")},  # noqa: E731
                               {n: [0, 1] for n in "ab"}, {n: [enc] for n in "ab"},
                               {n: eye[1].expand(2, -1) for n in "ab"}, {n: ["no", "yes"] for n in "ab"})
    assert route_and_score(model, data(), PrototypeRouter()).routing_accuracy == 0.5  # all routed to b
    with torch.no_grad():
        model.task("b").head.classifier.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^routed mixed-task scoring: the outputs of 2 example\(s\)"):
        route_and_score(model, data(), PrototypeRouter())
    assert torch.isfinite(embed(model, [enc])).all()
    with torch.no_grad():
        model.backbone.embeddings.LayerNorm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"router's backbone embeddings: the outputs of 2 example\(s\)"):
        embed(model, [enc])
