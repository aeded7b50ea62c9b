"""inference_linears: the frozen Linear weights held once (cast, prepacked on a CPU) for scoring and
generation. bf16 results are autocast's bit for bit, fp32 within rounding; the model is exactly
as before afterwards; gradients still flow; answers come back in the split's order when the
prompts are answered by length."""

from __future__ import annotations

import pytest
import torch

import adapters  # first: it makes a CPU-only torchvision importable before transformers imports it
from adapters.generation import generate
from adapters.precision import autocast, cpu_has_fast_bf16, inference_linears
from conftest import batch, lora_model

CPU = torch.device("cpu")


def untouched(model: adapters.DeltaModel) -> dict[str, tuple[int, torch.dtype]]:
    return {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}


def packed_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="bf16 prepacking needs a CPU with bf16 instructions")
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bf16_results_are_autocasts_bit_for_bit(arch):
    model = lora_model(arch)
    inputs = batch()
    with torch.no_grad(), autocast("bf16", CPU):
        want = model(**inputs)
        with inference_linears(model):
            assert packed_modules(model), "no layer was packed"
            got = model(**inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fp32_results_within_rounding_and_the_model_restored(arch):
    model = lora_model(arch)
    inputs = batch()
    before = untouched(model)
    with torch.no_grad():
        want = model(**inputs)
        with inference_linears(model):
            got = model(**inputs)
            with inference_linears(model):  # re-entrant: the inner block changes nothing
                again = model(**inputs)
        after = model(**inputs)
    assert torch.equal(got, again)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, want)  # the layers' own forward is back
    assert packed_modules(model) == [] and untouched(model) == before


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="bf16 prepacking needs a CPU with bf16 instructions")
def test_an_inner_block_in_another_dtype_computes_in_its_own():
    """fp32 copies held by an outer block must not serve an inner pass under bf16 autocast."""
    model = lora_model("llama")
    inputs = batch()
    with torch.no_grad():
        with autocast("bf16", CPU):
            want_bf16 = model(**inputs)
        with inference_linears(model):
            outer = model(**inputs)
            with autocast("bf16", CPU), inference_linears(model):
                inner = model(**inputs)
            back = model(**inputs)
    assert torch.equal(inner, want_bf16)
    assert torch.equal(back, outer)  # the outer block's fp32 copies are back
    assert packed_modules(model) == []


def test_an_error_inside_restores_the_model():
    model = lora_model("bert")
    with pytest.raises(RuntimeError, match="boom"):
        with inference_linears(model):
            raise RuntimeError("boom")
    assert packed_modules(model) == []


def test_gradients_flow_as_without_it():
    def grads(ctx) -> dict[str, torch.Tensor]:
        model = lora_model("llama")
        model.train()
        torch.manual_seed(0)
        with ctx(model):
            model(**batch()).logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    import contextlib

    plain, packed = grads(lambda m: contextlib.nullcontext()), grads(inference_linears)
    assert plain.keys() == packed.keys() and plain
    for n in plain:
        torch.testing.assert_close(packed[n], plain[n], rtol=1e-4, atol=1e-6)


def test_a_layer_with_a_trainable_parameter_keeps_its_own_forward():
    """A user who unfreezes part of the backbone trains it: no copy of it may go stale."""
    model = lora_model("bert")
    layer = model.backbone.get_submodule("encoder.layer.0.output.dense")
    layer.bias.requires_grad_(True)
    with inference_linears(model):
        packed = packed_modules(model.backbone)
        assert packed and "encoder.layer.0.output.dense" not in packed


def test_tied_lm_head_gets_its_own_copy_and_generation_agrees(lm_model, word_tokenizer):
    model = lm_model()
    model.add_task("g", "lora", generative=True)
    model.activate("g")
    emb = model.backbone.get_input_embeddings().weight
    assert model.lm_head.weight is emb  # tied
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = model.lm_head(model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state)
        plain = generate(model, ids, mask, max_new_tokens=4, eos_token_id=-1)
        with autocast("bf16", CPU), inference_linears(model):
            assert emb.dtype == torch.float32 and model.lm_head.weight is emb  # embeddings untouched
        with inference_linears(model):
            assert "lm_head" in [n for n, m in model.named_modules() if "forward" in m.__dict__][-1]
            got = model.lm_head(model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state)
            packed = generate(model, ids, mask, max_new_tokens=4, eos_token_id=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert packed == plain


def test_answers_come_back_in_the_splits_order(lm_model, word_tokenizer):
    """Scoring answers prompts by length; each answer must land on its own example."""
    from datasets import Dataset

    from continual.training import eval_loader
    from continual.training.evaluate import answers

    model = lm_model()
    model.add_task("g", "lora", generative=True)
    words = ["apple", "river", "music", "stone", "cloud", "light"]
    texts = [" ".join(words[: 1 + (i * 5) % 6]) for i in range(6)]  # lengths out of order
    ds = Dataset.from_dict({"text": texts, "target": ["yes"] * 6})
    loader = eval_loader(ds, word_tokenizer, 32, batch_size=1)  # one example a batch: order is all that differs
    ordered, order = loader.by_length()
    assert order != list(range(6)) and sorted(order) == list(range(6))
    preds, refs = answers(model, loader, ["g"])
    alone = []
    with model.using("g"):
        for b in loader:
            new = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=loader.max_new_tokens)
            alone.append(word_tokenizer.decode(new[0], skip_special_tokens=True).strip())
    assert preds == alone and refs == ["yes"] * 6
    assert len(set(alone)) > 1, "every prompt got the same answer: the check could not see a shuffle"
