"""Mixed-task batches: one pass, each example through its own task's delta and head.

The spec is parity: equal (allclose) to running each task's examples separately."""

import re

import pytest
import torch

import adapters
from adapters import ConfigError, SiteDelta, TaskError
from adapters.mixed import LoopSites
from conftest import ARCHS, batch, method_config, supports, tiny_backbone
from test_methods import perturb

SITE_METHODS = [m for m in adapters.available_methods()  # the site methods that declare mixed batches
                if adapters.get_method(m).capabilities.site_terms and adapters.get_method(m).capabilities.mixed_batches]
CASES = [(m, a) for m in SITE_METHODS for a in ARCHS if supports(m, a)]
# methods with their own stack_sites run batched matrix products, the others the per-task loop
STACKED = {m for m in SITE_METHODS if adapters.get_method(m).stack_sites.__func__ is not SiteDelta.stack_sites.__func__}


def three_tasks(arch, methods_per_task):
    model = adapters.DeltaModel(tiny_backbone(arch))
    for i, methods in enumerate(methods_per_task):
        task = model.add_task(f"t{i}", methods, num_labels=2 + i)
        perturb(task, scale=0.3, seed=i)  # zero-init deltas would make every task look alike
    model.eval()
    return model


def separate_logits(model, inputs, task_ids):
    """Reference: each example through its own task, one task at a time."""
    out = {}
    for i, t in enumerate(task_ids):
        model.activate(t)
        with torch.no_grad():
            out[i] = model(**{k: v[i : i + 1] for k, v in inputs.items()})[0]
    return out


def assert_parity(model, inputs, task_ids, atol=1e-5):
    mixed = model.mixed()
    with torch.no_grad():
        got = mixed(**inputs, task_ids=task_ids)
    want = separate_logits(model, inputs, task_ids)
    for i, t in enumerate(task_ids):
        n = model.task(t).head.num_labels
        torch.testing.assert_close(got[i, :n], want[i], atol=atol, rtol=1e-4)
        assert torch.isinf(got[i, n:]).all()
    return mixed


@pytest.mark.parametrize("method,arch", CASES)
def test_mixed_batch_equals_separate_runs(method, arch):
    model = three_tasks(arch, [[method_config(method)]] * 3)
    inputs = batch(b=6, t=9)
    inputs["attention_mask"][4, 3:] = 0
    if (method, arch) == ("selective", "mpnet"):  # its pattern hits MPNet's batch-wide position bias
        with pytest.raises(ConfigError, match="relative_attention_bias computes one output for the whole batch"):
            assert_parity(model, inputs, ["t2", "t0", "t1", "t0", "t2", "t1"])
        return
    mixed = assert_parity(model, inputs, ["t2", "t0", "t1", "t0", "t2", "t1"])
    loops = [m for m in mixed.stacked.values() if isinstance(m, LoopSites)]
    if method in STACKED:  # batched matrix products, no per-task loop
        assert not loops
    else:
        assert loops


def test_mixed_lora_with_different_ranks_and_targets():
    model = three_tasks("bert", [
        [{"method": "lora", "rank": 2}],
        [{"method": "lora", "rank": 6, "targets": ["query", "key", "value"]}],
        [{"method": "lora", "rank": 4, "alpha": 3.0}],
    ])
    assert_parity(model, batch(b=5), ["t1", "t1", "t0", "t2", "t0"])


def test_mixed_combinations_and_tasks_with_different_methods():
    model = three_tasks("bert", [
        [method_config("lora"), method_config("bottleneck")],
        [method_config("bottleneck")],
        [method_config("parallel"), method_config("bitfit")],
    ])
    assert_parity(model, batch(b=6), ["t0", "t1", "t2", "t2", "t1", "t0"])


def test_bottlenecks_of_different_sizes_stack_by_zero_padding():
    model = three_tasks("bert", [[{"method": "bottleneck", "bottleneck_dim": d}] for d in (2, 8, 5)])
    mixed = assert_parity(model, batch(b=4), ["t0", "t1", "t2", "t1"])
    assert not any(isinstance(m, LoopSites) for m in mixed.stacked.values())


def test_a_batch_of_one_task_and_the_model_is_unchanged_outside_mixed_forward():
    model = three_tasks("bert", [[method_config("lora")]] * 3)
    inputs = batch(b=3)
    model.activate("t1")
    with torch.no_grad():
        before = model(**inputs)
    mixed = assert_parity(model, inputs, ["t1", "t1", "t1"])
    model.activate("t1")
    with torch.no_grad():
        assert torch.equal(model(**inputs), before)
    mixed.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs), before)


def test_index_tensor_and_errors():
    model = three_tasks("bert", [[method_config("lora")]] * 2)
    mixed = model.mixed()
    inputs = batch(b=3)
    with torch.no_grad():
        by_name = mixed(**inputs, task_ids=["t1", "t0", "t1"])
        by_index = mixed(**inputs, task_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(by_name, by_index)
    with pytest.raises(TaskError, match="not in this mixed set"):
        mixed(**inputs, task_ids=["t0", "nope", "t1"])
    with pytest.raises(TaskError, match="out of range"):
        mixed(**inputs, task_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="3 examples but 2 task ids"):
        mixed(**inputs, task_ids=["t0", "t1"])

    # a string is a sequence of one-letter names: with tasks named "a" and "b", "ab" was served as both
    model = adapters.DeltaModel(tiny_backbone("bert"))
    for name in "ab":
        model.add_task(name, "lora", num_labels=2)
    with pytest.raises(TaskError, match="as a list of names"):
        model.mixed("ab")
    with pytest.raises(TaskError, match="as a list; got the string 'ab'"):
        model.mixed(["a", "b"])(**batch(b=2), task_ids="ab")
    with pytest.raises(TaskError, match=re.escape("several tasks: activate('a', 'b')")):
        model.activate(["a", "b"])

def test_a_task_changed_after_the_mixed_set_was_built_is_refused_not_served_stale():
    """The mixed set holds copies: a task trained (or loaded) after it was built was served with
    its old weights, without a word."""
    model = three_tasks("bert", [[method_config("lora")]] * 2)
    mixed = model.mixed()
    inputs = batch(b=3)
    with torch.no_grad():
        mixed(**inputs, task_ids=["t1", "t0", "t1"])
        next(model.task("t1").head.parameters()).add_(1.0)  # an optimizer step does the same, in place
    with pytest.raises(TaskError, match=r"tasks \['t1'\] changed .* build it again with model.mixed"):
        mixed(**inputs, task_ids=["t0", "t0", "t0"])
    assert_parity(model, inputs, ["t1", "t0", "t1"])  # built again: the new weights, as the task runs alone


def test_methods_that_change_the_attention_are_refused_with_the_reason():
    model = adapters.DeltaModel(tiny_backbone("bert"))
    model.add_task("a", [method_config("lora")], num_labels=2)
    model.add_task("p", [method_config("prefix")], num_labels=2)
    with pytest.raises(ConfigError, match="task 'p' uses prefix, which cannot share a batch.*attention"):
        model.mixed()
    model.add_task("nohead", [method_config("lora")])
    with pytest.raises(TaskError, match="no head"):
        model.mixed(["a", "nohead"])


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tuning_in_mixed_batches(arch):
    """Prompts of different lengths, a task without one, and prompt + LoRA, in one batch: every
    example sees its own prompt at the positions it has when its task runs alone."""
    tasks = [[{"method": "prompt", "num_tokens": 4}], [{"method": "prompt", "num_tokens": 6}, method_config("lora")],
             [method_config("lora")]]
    model = three_tasks(arch, tasks)
    inputs = batch(b=6, t=9)
    inputs["attention_mask"][4, 3:] = 0
    mixed = assert_parity(model, inputs, ["t2", "t0", "t1", "t0", "t2", "t1"])
    assert len(mixed.inputs) == 1


def test_prompt_mixed_batch_keeps_token_types():
    model = three_tasks("bert", [[{"method": "prompt", "num_tokens": 3}], [{"method": "prompt", "num_tokens": 5}]])
    inputs = batch(b=4, t=8)
    inputs["token_type_ids"] = (torch.arange(8) >= 4).long().expand(4, -1).clone()
    assert_parity(model, inputs, ["t1", "t0", "t0", "t1"])
