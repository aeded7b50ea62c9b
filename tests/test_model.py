"""Many deltas on one backbone: activation, combinations, errors, accounting."""

import re

import pytest
import torch

import adapters
from adapters import ConfigError, TargetError, TaskError
from conftest import batch, method_config, tiny_backbone


def states(model, inputs):
    with torch.no_grad():
        return model.encode(**inputs)[0]


def randomize(task, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_tasks_coexist_and_activation_switches(arch):
    model = adapters.DeltaModel(tiny_backbone(arch))
    inputs = batch()
    for i, name in enumerate(["a", "b"]):
        model.add_task(name, "lora", num_labels=2)
        randomize(model.task(name), seed=i)
    model.activate("a")
    out_a = states(model, inputs)
    model.activate("b")
    out_b = states(model, inputs)
    model.activate("a")
    assert torch.equal(states(model, inputs), out_a)
    assert not torch.allclose(out_a, out_b)
    model.deactivate()
    with model.disabled():
        base = states(model, inputs)
    assert torch.equal(states(model, inputs), base)
    with model.using("b"):
        assert torch.equal(states(model, inputs), out_b)
    assert model.active_tasks == ()


def test_only_active_unfrozen_task_is_trainable(tiny_model):
    for name in ["a", "b"]:
        tiny_model.add_task(name, "bottleneck", num_labels=2)
    tiny_model.activate("b")
    ids = {id(p) for p in tiny_model.trainable_parameters()}
    assert ids == {id(p) for p in tiny_model.task("b").parameters()}
    tiny_model.freeze("b")
    assert tiny_model.trainable_parameters() == []
    tiny_model.unfreeze("b")
    assert tiny_model.trainable_parameters()


def test_heads_differ_per_task(tiny_model):
    tiny_model.add_task("two", "bitfit", label_names=["neg", "pos"])
    tiny_model.add_task("five", "bitfit", num_labels=5)
    inputs = batch()
    tiny_model.activate("two")
    assert tiny_model(**inputs).shape == (3, 2)
    tiny_model.activate("five")
    assert tiny_model(**inputs).shape == (3, 5)
    assert tiny_model.task("two").label_names == ["neg", "pos"]


def test_a_batch_of_unsound_shape_gets_a_clear_error(tiny_model):
    # the backbone's own errors here are reshape or broadcast failures deep inside it
    tiny_model.add_task("t", "lora", num_labels=2)
    tiny_model.activate("t")
    ids = batch()["input_ids"]
    cases = [(ids[:0], "hold no tokens"), (ids[:, :0], "hold no tokens"), (ids[0], "(batch, length)"),
             (ids.float(), "integer token ids"), (None, "got None")]
    for bad, says in cases:
        with pytest.raises(ValueError, match=re.escape(says)):
            tiny_model(bad)
    with pytest.raises(ValueError, match="attention_mask's shape"):
        tiny_model(ids, torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.long))
    assert tiny_model(ids.int()).shape == (ids.shape[0], 2)  # any integer dtype is a token id


@pytest.mark.parametrize("arch, limit", [("bert", 256), ("mpnet", 254), ("llama", None)])
def test_an_input_longer_than_the_position_table_gets_a_clear_error(arch, limit):
    """BERT's 256 positions here (MPNet's start after its padding index; Llama's are rotary: no
    table): a longer input, or one a prompt pushes past it, failed as an 'expanded size' error
    inside the backbone, plain or in a mixed batch."""
    model = adapters.DeltaModel(tiny_backbone(arch))
    assert model.max_positions == limit
    model.add_task("t", "lora", num_labels=2)
    model.add_task("p", method_config("prompt"), num_labels=2)  # 4 prompt tokens
    model.activate("t")
    fits = limit or 300
    assert model(torch.ones(1, fits, dtype=torch.long)).shape == (1, 2)
    if limit is None:
        return
    with pytest.raises(ValueError, match=f"an input of {limit + 1} tokens needs {limit + 1} positions, more than the {limit}"):
        model(torch.ones(1, limit + 1, dtype=torch.long))
    model.activate("p")
    says = f"an input of {limit - 3} tokens \\+ 4 prepended by its deltas needs {limit + 1} positions"
    with pytest.raises(ValueError, match=says):
        model(torch.ones(1, limit - 3, dtype=torch.long))
    with pytest.raises(ValueError, match=says):
        model.mixed(["t", "p"])(torch.ones(2, limit - 3, dtype=torch.long), task_ids=["t", "p"])


def test_combination_applies_every_method(arch):
    """adapter + BitFit + prompt on one task: each part changes the output."""
    model = adapters.DeltaModel(tiny_backbone(arch))
    combo = [method_config("bottleneck"), "bitfit", method_config("prompt")]
    task = model.add_task("combo", combo, num_labels=2)
    assert list(task.deltas) == ["bottleneck", "bitfit", "prompt"]
    randomize(task, seed=3)
    model.activate("combo")
    inputs = batch()
    full = states(model, inputs)
    for key in ["bottleneck", "bitfit"]:
        with torch.no_grad():
            saved = [p.clone() for p in task.deltas[key].parameters()]
            for p in task.deltas[key].parameters():
                p.zero_()
        assert not torch.allclose(states(model, inputs), full), f"{key} had no effect in the combination"
        with torch.no_grad():
            for p, s in zip(task.deltas[key].parameters(), saved):
                p.copy_(s)
    groups = task.param_groups()
    assert {g["name"] for g in groups} == {"bottleneck", "bitfit", "prompt", "head"}
    assert {g["name"]: g["lr"] for g in groups}["prompt"] == adapters.make_config("prompt").default_lr


def test_same_method_twice_gets_distinct_keys(tiny_model):
    task = tiny_model.add_task("t", ["lora", {"method": "lora", "targets": ["attn_out"]}], num_labels=2)
    assert list(task.deltas) == ["lora", "lora_1"]


def test_adapter_drop_skips_first_layers(tiny_model):
    full = tiny_model.add_task("full", "bottleneck", num_labels=2)
    drop = tiny_model.add_task("drop", {"method": "bottleneck", "skip_first": 1}, num_labels=2)
    assert {s.layer for s in full.deltas["bottleneck"].sites} == {0, 1}
    assert {s.layer for s in drop.deltas["bottleneck"].sites} == {1}
    assert drop.delta_parameters() == full.delta_parameters() // 2


def test_layers_option_and_module_path_targets(tiny_model):
    task = tiny_model.add_task("t", {"method": "lora", "targets": ["ffn_up"], "layers": [-1]}, num_labels=2)
    assert [s.layer for s in task.deltas["lora"].sites] == [1]


def test_targets_matching_nothing_list_candidates(tiny_model):
    with pytest.raises(TargetError) as e:
        tiny_model.add_task("t", {"method": "lora", "targets": ["q_projj"]}, num_labels=2)
    msg = str(e.value)
    assert "q_projj" in msg and "roles" in msg and "query" in msg
    with pytest.raises(TargetError, match="candidates"):
        tiny_model.add_task("u", {"method": "selective", "patterns": ["no_such_module"]}, num_labels=2)
    assert "t" not in tiny_model.tasks and "u" not in tiny_model.tasks


def test_layer_out_of_range(tiny_model):
    with pytest.raises(TargetError, match="out of range"):
        tiny_model.add_task("t", {"method": "lora", "layers": [7]}, num_labels=2)


def test_a_target_or_layer_named_twice_is_refused(tiny_model):
    """Named twice, a target had put the delta's term on one module twice (and a layer was merged
    without a word): each is refused, the literal repeat when the config is made, an alias (0 and
    -2 of 2 blocks; a role and its module path) when it is attached; no task is left behind."""
    with pytest.raises(ConfigError, match=r"targets \['query', 'query'\] name \['query'\] more than once"):
        adapters.make_config("lora", targets=("query", "query"))
    with pytest.raises(ConfigError, match="layers"):
        adapters.make_config("prefix", layers=(1, 1))
    with pytest.raises(TargetError, match=r"name block\(s\) \[0\] more than once"):
        tiny_model.add_task("t", {"method": "lora", "layers": [0, -2]}, num_labels=2)
    bert = adapters.DeltaModel(tiny_backbone("bert"))
    with pytest.raises(TargetError, match="'query' and 'attention.self.query' name the same module"):
        bert.add_task("t", {"method": "lora", "targets": ["query", "attention.self.query"]}, num_labels=2)
    with pytest.raises(TargetError, match="more than once"):
        bert.add_task("t", {"method": "prefix", "layers": [1, -1]}, num_labels=2)
    assert "t" not in tiny_model.tasks and "t" not in bert.tasks
    assert [s.layer for s in tiny_model.add_task("t", {"method": "lora", "layers": [0, -1]}, num_labels=2).deltas["lora"].sites] == [0, 1, 0, 1]


def test_task_name_errors(tiny_model):
    tiny_model.add_task("a", "lora", num_labels=2)
    with pytest.raises(TaskError, match="already exists"):
        tiny_model.add_task("a", "lora", num_labels=2)
    with pytest.raises(TaskError, match="invalid task name"):
        tiny_model.add_task("a.b", "lora", num_labels=2)
    with pytest.raises(TaskError, match="unknown task 'zzz'; known tasks: a"):
        tiny_model.activate("zzz")
    with pytest.raises(TaskError, match="no task selected"):
        tiny_model(**batch())
    with pytest.raises(adapters.UnknownMethodError, match="known methods"):
        tiny_model.add_task("b", "adapterr", num_labels=2)
    with pytest.raises(ConfigError, match="label_names"):
        tiny_model.add_task("c", "lora", num_labels=3, label_names=["x", "y"])
    # two classes of one name: a prediction named either (the stream files refused it; the API did not)
    with pytest.raises(ConfigError, match=r"label_names \['x', 'y', 'y'\] must be distinct names"):
        tiny_model.add_task("c", "lora", label_names=["x", "y", "y"])
    with pytest.raises(ConfigError, match="in a list"):  # one string was read as its letters, a head of 2
        tiny_model.add_task("c", "lora", label_names="xy")
    with pytest.raises(ConfigError, match="whole number of labels, at least 2, got 2.5"):  # was a TypeError in torch
        tiny_model.add_task("c", "lora", num_labels=2.5)
    assert "c" not in tiny_model.tasks


def test_unknown_architecture_works_with_named_targets():
    """GPT-2 is not in adapters/targets.py: its blocks are found from the module tree, a role name
    fails listing the block's linear layers, and naming one of them works (GPT-2's Conv1D too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()
    model = adapters.DeltaModel(gpt2)
    assert model.spec.layers == "h" and model.spec.kind == "decoder" and model.lm_head is not None
    with pytest.raises(TargetError, match=r"linear layer inside a block: \['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'\]"):
        model.add_task("t", "lora", num_labels=2)
    ids = torch.randint(0, 120, (2, 7))
    reference = gpt2(input_ids=ids).logits
    model.add_task("g", {"method": "lora", "targets": ["attn.c_attn"], "rank": 4}, generative=True)
    model.activate("g")
    base = model(input_ids=ids)
    assert torch.allclose(base, reference, atol=1e-5)  # zero-init: GPT-2's own logits
    torch.nn.init.normal_(next(p for n, p in model.task("g").named_parameters() if "lora_B" in n))
    assert not torch.allclose(model(input_ids=ids), base, atol=1e-3)  # a trained B changes them


def test_parameter_report():
    tiny_model = adapters.DeltaModel(tiny_backbone("bert"))
    tiny_model.add_task("t", ["lora", "bitfit"], num_labels=4)
    r = tiny_model.parameter_report("t")
    # LoRA r=8 on query and value of 2 layers, 32 -> 32: 2 * 2 * (8*32 + 32*8)
    assert r["methods"]["lora"] == 2 * 2 * (8 * 32 + 32 * 8)
    assert r["delta_params"] == sum(r["methods"].values())
    assert r["head_params"] == 32 * 4 + 4
    assert r["delta_ratio"] == pytest.approx(r["delta_params"] / tiny_model.backbone_parameters())


def test_new_tasks_follow_the_model_mode():
    model = adapters.DeltaModel(tiny_backbone("bert"))  # backbone in eval mode
    assert not model.training
    task = model.add_task("t", "lora", num_labels=2)
    assert not any(m.training for m in task.modules())
    inputs = batch()
    model.activate("t")
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs))  # no dropout at inference
    model.train()
    assert all(m.training for m in model.add_task("u", "lora", num_labels=2).modules())
