"""Generation through task deltas on a tiny random-init causal LM: the parity spec.

- a zero-init delta generates exactly what the base model generates (checked against
  transformers' own greedy ``generate``);
- the KV-cached loop equals recomputing the whole sequence at every step, for every method,
  prompt and prefix tuning included (their soft positions must be right with the cache);
- a padded batch equals one example at a time;
- a mixed-task batch (each example through its own task's delta) equals each task alone;
- detaching restores the base model's logits bit for bit.
Float64, so that greedy ties cannot flip on rounding and every comparison can be exact."""

from __future__ import annotations

import pytest
import torch

import adapters  # first: it makes a CPU-only torchvision importable before transformers imports it
from transformers import LlamaConfig, LlamaForCausalLM
from adapters.errors import ConfigError, TaskError
from adapters.generation import generate

from conftest import TINY, method_config, tiny_backbone

EOS = 3
METHODS = [m for m in adapters.available_methods() if not adapters.get_method(m).capabilities.composite]


def tiny_lm() -> adapters.DeltaModel:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS,
                                      pad_token_id=0, bos_token_id=1))
    return adapters.DeltaModel(lm.double().eval())


def prompts(b: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (the layout batched decoding uses)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (b, 7), generator=g)
    mask = torch.ones(b, 7, dtype=torch.long)
    for r in range(1, b):
        mask[r, : r * 2] = 0
        ids[r, : r * 2] = 0
    return ids, mask


def perturb(task: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter of a task non-trivial values (a zero-init delta would prove little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def test_zero_init_generates_what_the_base_model_generates():
    model = tiny_lm()
    ids, mask = prompts()
    lm = LlamaForCausalLM(model.backbone.config)
    lm.model, lm.lm_head = model.backbone, model.lm_head  # the very same modules
    ref = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    model.add_task("t", "lora", generative=True)
    model.activate("t")
    got = generate(model, ids, mask, max_new_tokens=6, eos_token_id=EOS)
    expect = [[t for t in row.tolist()[7:]] for row in ref]
    expect = [row[: row.index(EOS)] if EOS in row else row for row in expect]
    assert got == expect


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recomputing(method):
    model = tiny_lm()
    model.add_task("t", method_config(method), generative=True)
    perturb(model.task("t"))
    model.activate("t")
    ids, mask = prompts()
    cached = generate(model, ids, mask, max_new_tokens=6, eos_token_id=EOS)
    full = generate(model, ids, mask, max_new_tokens=6, eos_token_id=EOS, use_cache=False)
    assert cached == full
    # a padded batch equals each example alone (no padding at all)
    alone = [generate(model, ids[r : r + 1, mask[r].bool()], None, max_new_tokens=6, eos_token_id=EOS)[0] for r in range(3)]
    assert cached == alone


@pytest.mark.parametrize("methods", [["lora", "prompt"], ["bottleneck", "lora"], ["prompt", "parallel", "bitfit"]])
def test_mixed_generation_equals_each_task_alone(methods):
    model = tiny_lm()
    for i, m in enumerate(methods):
        model.add_task(f"t{i}", method_config(m), generative=True)
        perturb(model.task(f"t{i}"), seed=i)
    ids, mask = prompts(b=6, seed=5)
    task_ids = [f"t{i % len(methods)}" for i in range(6)]
    mixed = model.mixed()
    got = generate(model, ids, mask, max_new_tokens=5, eos_token_id=EOS, mixed=mixed, task_ids=task_ids)
    for r, t in enumerate(task_ids):
        with model.using(t):
            assert got[r] == generate(model, ids[r : r + 1], mask[r : r + 1], max_new_tokens=5, eos_token_id=EOS)[0]
    uncached = generate(model, ids, mask, max_new_tokens=5, eos_token_id=EOS, mixed=mixed, task_ids=task_ids, use_cache=False)
    assert got == uncached


def test_detach_restores_base_logits_bit_for_bit():
    model = tiny_lm()
    ids, mask = prompts()
    model.add_task("base", [], generative=True)
    model.activate("base")
    before = model(input_ids=ids, attention_mask=mask)
    model.add_task("t", ["lora", "prefix"], generative=True)
    perturb(model.task("t"))
    model.activate("t")
    assert not torch.equal(model(input_ids=ids, attention_mask=mask), before)
    model.remove_task("t")
    model.activate("base")
    assert torch.equal(model(input_ids=ids, attention_mask=mask), before)


def test_generation_errors_are_clear():
    model = tiny_lm()
    model.add_task("cls", "lora", num_labels=2)
    model.activate("cls")
    ids, mask = prompts()
    with pytest.raises(TaskError, match="not generative"):
        generate(model, ids, mask)
    with pytest.raises(TaskError, match="either classification tasks or generative"):
        model.add_task("gen", "lora", generative=True)
        model.mixed(["cls", "gen"])
    encoder = adapters.DeltaModel(tiny_backbone("bert"))
    with pytest.raises(ConfigError, match="no language-model head"):
        encoder.add_task("g", "lora", generative=True)
