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
    assert e.value.args[1] == 6  # all three batches were answered, then refused together
