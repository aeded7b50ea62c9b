"""The spec every registered method must meet, on tiny BERT, MPNet and Llama backbones.

Parametrized over ``adapters.available_methods()``: a new method file is tested automatically.
"""

import pytest
import torch

import adapters
from adapters import TargetError
from conftest import ARCHS, batch, method_config, supports, tiny_backbone

CASES = [(m, a) for m in adapters.available_methods() for a in ARCHS if supports(m, a)]
REFUSED = [(m, a) for m in adapters.available_methods() for a in ARCHS if not supports(m, a)]


def make(method, arch, **task_kwargs):
    model = adapters.DeltaModel(tiny_backbone(arch))
    model.add_task("t", [method_config(method)], num_labels=3, **task_kwargs)
    return model


def perturb(module, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def states(model, inputs):
    with torch.no_grad():
        return model.encode(**inputs)[0]


@pytest.mark.parametrize("method,arch", CASES)
def test_zero_init_gives_backbone_output(method, arch):
    model = make(method, arch)
    inputs = batch()
    with model.disabled():
        base = states(model, inputs)
    model.activate("t")
    out = states(model, inputs)
    if adapters.get_method(method).capabilities.identity_at_init:
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    else:  # prefix / prompt: attended positions act from the start
        assert not torch.allclose(out, base)


@pytest.mark.parametrize("method,arch", CASES)
def test_detach_restores_bit_identical_outputs(method, arch):
    backbone = tiny_backbone(arch)
    inputs = batch()
    attn_impl = backbone.config._attn_implementation
    with torch.no_grad():
        reference = backbone(**inputs).last_hidden_state.clone()
    model = adapters.DeltaModel(backbone)
    model.add_task("t", [method_config(method)], num_labels=2)
    perturb(model.task("t"))
    model.activate("t")
    changed = states(model, inputs)
    assert not torch.allclose(changed, reference, atol=1e-4), "the perturbed delta must change the output"
    with model.disabled():
        assert torch.equal(states(model, inputs), reference)
    model.remove_task("t")
    assert torch.equal(states(model, inputs), reference)
    leftover = [n for n, m in backbone.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftover == [], f"hooks left on {leftover}"
    assert backbone.config._attn_implementation == attn_impl
    with torch.no_grad():
        assert torch.equal(backbone(**inputs).last_hidden_state, reference)


@pytest.mark.parametrize("method,arch", CASES)
def test_training_moves_only_the_active_delta(method, arch):
    model = adapters.DeltaModel(tiny_backbone(arch))
    model.add_task("other", [method_config(method)], num_labels=3)
    model.add_task("t", [method_config(method)], num_labels=3)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    other_before = {k: v.clone() for k, v in model.task("other").state_dict().items()}
    task_before = {k: v.clone() for k, v in model.task("t").deltas.state_dict().items()}
    model.activate("t")
    trainable = set(map(id, model.trainable_parameters()))
    assert trainable == {id(p) for p in model.task("t").parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    inputs, labels = batch(), torch.tensor([0, 1, 2])
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(**inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f"backbone weight {k} changed"
    for k, v in model.task("other").state_dict().items():
        assert torch.equal(v, other_before[k]), f"inactive task's {k} changed"
    moved = [k for k, v in model.task("t").deltas.state_dict().items() if not torch.equal(v, task_before[k])]
    assert moved, "training did not change the active delta"


@pytest.mark.parametrize("method,arch", CASES)
def test_frozen_task_is_not_trainable_and_keeps_its_outputs(method, arch):
    model = make(method, arch)
    perturb(model.task("t"), scale=0.1)
    model.activate("t")
    inputs = batch()
    before = states(model, inputs)
    model.freeze("t")  # folds reparameterisations (prefix MLP): outputs must not move
    assert model.trainable_parameters() == []
    torch.testing.assert_close(states(model, inputs), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,arch", REFUSED)
def test_unsupported_combination_is_refused_clearly(method, arch):
    if not adapters.get_method(method).capabilities.decoders:  # it selects by a query over the input
        error, message = adapters.ConfigError, "decoder-only backbone"
    else:
        error, message = {"prefix": (TargetError, "attention interface")}[method]
    with pytest.raises(error, match=message):
        make(method, arch)
