"""AdapterFusion over any layer-wise delta, merges and fusion inspection (tiny random-init models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adapters

from adapters import ConfigError, DeltaModel, TaskError, load_task, save_task
from conftest import batch, method_config, tiny_backbone
from fusion import FusionConfig, add_fusion, fusion_delta, fusion_weights, merge_tasks

FUSABLE = [m for m in adapters.available_methods() if adapters.get_method(m).capabilities.fusable]  # ia3 too


def _randomise(model: DeltaModel, name: str, seed: int) -> None:
    """Give a task's delta non-trivial weights (fresh deltas are mostly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.task(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model: DeltaModel, task: str, b: dict) -> torch.Tensor:
    model.eval()
    with model.using(task):
        return model(**b)


@pytest.mark.parametrize("methods", [[m] for m in FUSABLE] + [["lora", "bottleneck"], ["bitfit", "parallel"]],
                         ids=lambda m: "+".join(m))
def test_fusion_of_one_source_is_that_source(arch, methods):
    """Softmax over one source is 1 and V starts as the identity: the fused model is the source's,
    on every architecture, for every layer-wise method and for combinations."""
    if (methods, arch) == (["selective"], "mpnet"):  # its patterns reach MPNet's relative position bias
        model = DeltaModel(tiny_backbone(arch))
        model.add_task("src", [method_config("selective")], num_labels=2)
        with pytest.raises(ConfigError, match="relative_attention_bias, a table"):
            add_fusion(model, "fused", ["src"], ["x", "y"])
        return
    model = DeltaModel(tiny_backbone(arch))
    model.add_task("src", [method_config(m) for m in methods], num_labels=3)
    _randomise(model, "src", 1)
    add_fusion(model, "fused", ["src"], head_from="src")
    b = batch()
    torch.testing.assert_close(_logits(model, "fused", b), _logits(model, "src", b), rtol=1e-5, atol=1e-5)


def test_two_identical_sources_fuse_to_either(arch):
    """Whatever the attention weights, the mix of two equal terms is that term."""
    model = DeltaModel(tiny_backbone(arch))
    for name in ("a", "b"):
        model.add_task(name, [method_config("lora")], num_labels=2)
        _randomise(model, name, 7)
    add_fusion(model, "fused", ["a", "b"], head_from="a")
    fusion = fusion_delta(model, "fused")
    with torch.no_grad():
        for layer in fusion.layers.values():
            layer.query.weight.normal_()  # attention far from uniform
            layer.key.weight.normal_()
    torch.testing.assert_close(_logits(model, "fused", batch()), _logits(model, "a", batch()), rtol=1e-4, atol=1e-5)


def test_fusion_of_mixed_methods_trains_only_fusion_and_head():
    """LoRA (query/value), a parallel adapter (FFN block) and a bottleneck adapter (attn_out, ffn_out):
    the fusion acts at the union of their modules; a step changes only fusion and head weights."""
    model = DeltaModel(tiny_backbone("bert"))
    for i, m in enumerate(["lora", "parallel", "bottleneck"]):
        model.add_task(m, [method_config(m)], num_labels=2)
        _randomise(model, m, i)
    task = add_fusion(model, "fused", label_names=["x", "y"])
    fusion = fusion_delta(model, "fused")
    assert fusion.sources() == ("lora", "parallel", "bottleneck")
    assert len(fusion.modules_fused) == 2 * 4  # query, value, attn_out, ffn_out in 2 layers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("tasks.fused.")}
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    model.activate("fused")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("tasks.fused.") for n in trainable)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**batch()), torch.tensor([0, 1, 0]))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in task.named_parameters() if not torch.equal(p, before[n])]
    assert any("query" in n for n in changed) and any("head" in n for n in changed)


def test_fusion_refuses_prompt_and_prefix_with_the_reason():
    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("p", [method_config("prompt")], num_labels=2)
    model.add_task("ok", [method_config("lora")], num_labels=2)
    with pytest.raises(ConfigError, match="prompt delta is not layer-wise"):
        add_fusion(model, "fused", ["ok", "p"], label_names=["a", "b"])
    assert "fused" not in model.tasks
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        add_fusion(model, "fused", ["ok", "nope"], label_names=["a", "b"])
    with pytest.raises(ConfigError, match="sources repeat"):
        FusionConfig(sources=("ok", "ok"))
    # a fusion of a fusion: the reason is that, not that it "is not layer-wise (prompt and prefix ...)"
    add_fusion(model, "f", ["ok"], label_names=["a", "b"])
    with pytest.raises(ConfigError, match=r"its fusion delta is built over tasks \['ok'\]; fuse those tasks instead"):
        add_fusion(model, "ff", ["f"], label_names=["a", "b"])
    # a string is a sequence of one-letter names: with tasks "x" and "y", "xy" fused (or merged) both
    for n in "xy":
        model.add_task(n, [method_config("lora")], num_labels=2)
    with pytest.raises(ConfigError, match="as a list of task names"):
        add_fusion(model, "fxy", "xy", label_names=["a", "b"])
    with pytest.raises(ConfigError, match="as a list of task names"):
        merge_tasks(model, "mxy", "xy", label_names=["a", "b"])
    assert not model.task("x").frozen and not {"fxy", "mxy"} & set(model.tasks)


def test_sources_cannot_be_removed_under_a_fusion():
    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("a", [method_config("lora")], num_labels=2)
    add_fusion(model, "f", ["a"], head_from="a")
    with pytest.raises(TaskError, match="used by"):
        model.remove_task("a")
    model.remove_task("f")
    model.remove_task("a")
    assert not model.tasks


def test_temperature_moves_only_in_training_steps():
    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("a", [method_config("bottleneck")], num_labels=2)
    add_fusion(model, "f", ["a"], head_from="a", temperature=5.0, temperature_end=1.0, temperature_steps=4)
    fusion = fusion_delta(model, "f")
    _logits(model, "f", batch())
    assert float(fusion.temperature) == 5.0  # an eval forward changes nothing
    fusion.on_train_step(2, 10)
    assert float(fusion.temperature) == pytest.approx(3.0)
    fusion.on_train_step(9, 10)
    assert float(fusion.temperature) == pytest.approx(1.0)


def test_fusion_checkpoint_round_trip(tmp_path):
    model = DeltaModel(tiny_backbone("bert"))
    for i, m in enumerate(["lora", "bottleneck"]):
        model.add_task(m, [method_config(m)], num_labels=2)
        _randomise(model, m, i)
    add_fusion(model, "f", label_names=["x", "y"])
    _randomise(model, "f", 5)
    want = _logits(model, "f", batch())
    for name in ("lora", "bottleneck", "f"):
        save_task(model, name, tmp_path / name)
    fresh = DeltaModel(tiny_backbone("bert"))
    with pytest.raises(Exception, match="unknown task 'lora'"):
        load_task(fresh, tmp_path / "f")  # its sources are needed first
    for name in ("lora", "bottleneck", "f"):
        load_task(fresh, tmp_path / name)
    torch.testing.assert_close(_logits(fresh, "f", batch()), want)


def test_fusion_weights_table_heatmap_and_mlflow(tmp_path):
    from mlflow import MlflowClient

    from continual.plots import write_fusion_report
    from continual.tracking import log_fusion_weights

    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("lora", [method_config("lora")], num_labels=2)
    model.add_task("ffn", [{"method": "bottleneck", "bottleneck_dim": 4, "targets": ["ffn_out"]}], num_labels=2)
    for i, n in enumerate(("lora", "ffn")):
        _randomise(model, n, i)
    add_fusion(model, "f", label_names=["x", "y"])
    w = fusion_weights(model, "f", [batch(), batch(seed=3)])
    assert w.weights.shape == (6, 2) and w.sources == ["lora", "ffn"]
    np.testing.assert_allclose(w.weights.sum(1), 1.0, rtol=1e-5)
    # at query/value only LoRA adds a term; at ffn_out only the adapter does
    for row, module in zip(w.weights, w.modules):
        expect = [1.0, 0.0] if module.endswith(("query", "value")) else [0.0, 1.0]
        np.testing.assert_allclose(row, expect, atol=1e-6)
    assert "| L0 attention.self.query |" in w.table()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("fusion-test", artifact_location=(tmp_path / "art").as_uri()))
    paths = write_fusion_report(w, tmp_path / "out")  # fusion computes; continual draws and logs
    log_fusion_weights(client, run.info.run_id, w, paths)
    assert [p.suffix for p in paths] == [".csv", ".md", ".png"] and paths[2].stat().st_size > 1000
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "fusion")}
    assert logged == {f"fusion/{p.name}" for p in paths}
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["fusion_weight/f/lora"] == pytest.approx(w.mean()["lora"])


def test_recorded_weights_ignore_padding():
    model = DeltaModel(tiny_backbone("bert"))
    for i, n in enumerate(("a", "b")):
        model.add_task(n, [method_config("lora")], num_labels=2)
        _randomise(model, n, i)
    add_fusion(model, "f", label_names=["x", "y"])
    b = batch()
    full = fusion_weights(model, "f", [b])
    trimmed = {"input_ids": b["input_ids"][1:2, :6], "attention_mask": b["attention_mask"][1:2, :6]}
    padded = {"input_ids": b["input_ids"][1:2], "attention_mask": b["attention_mask"][1:2]}
    np.testing.assert_allclose(fusion_weights(model, "f", [padded]).weights, fusion_weights(model, "f", [trimmed]).weights,
                               rtol=1e-5, atol=1e-6)
    assert full.tokens == int(b["attention_mask"].sum())


def test_linear_and_weighted_merge():
    model = DeltaModel(tiny_backbone("bert"))
    for i, n in enumerate(("a", "b")):
        model.add_task(n, [method_config("bitfit")], num_labels=2)
        _randomise(model, n, i)
    pa, pb = (dict(model.task(n).deltas.named_parameters()) for n in ("a", "b"))
    merged = merge_tasks(model, "avg", ["a", "b"], head_from="a")
    for k, p in merged.deltas.named_parameters():
        torch.testing.assert_close(p, (pa[k] + pb[k]) / 2)
    arith = merge_tasks(model, "arith", ["a", "b"], [1.0, -0.5], label_names=["p", "q", "r"])
    for k, p in arith.deltas.named_parameters():
        torch.testing.assert_close(p, pa[k] - 0.5 * pb[k])
    assert arith.head.num_labels == 3
    # BitFit's term is linear in its parameters: the merged model adds the mean of the two shifts
    torch.testing.assert_close(model.task("avg").head.classifier.weight, model.task("a").head.classifier.weight)
    # training a merged task fits its head only
    model.activate("arith")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("tasks.arith.head.") for n in names)


def test_merge_refuses_different_configs():
    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("a", [method_config("lora")], num_labels=2)
    model.add_task("b", [{"method": "lora", "rank": 2}], num_labels=2)
    with pytest.raises(ConfigError, match="configs differ"):
        merge_tasks(model, "m", ["a", "b"], head_from="a")
    with pytest.raises(ConfigError, match="exactly one of head_from"):
        merge_tasks(model, "m", ["a"])



def test_merge_refuses_non_finite_weights_and_mixed_folded_forms_leaving_the_model_as_it_was():
    """A NaN weight made every merged parameter NaN (scores from NaN logits, exit 0); a frozen
    prefix (folded) merged with a trained one failed on a missing key after adding the task."""
    model = DeltaModel(tiny_backbone("bert"))
    for n in ("a", "b"):
        model.add_task(n, [method_config("lora")], num_labels=2)
    for w in ([float("nan"), 1.0], [float("inf"), 0.0]):
        with pytest.raises(ConfigError, match="finite"):
            merge_tasks(model, "m", ["a", "b"], w, head_from="a")
    for n in ("p", "q"):
        model.add_task(n, [{"method": "prefix", "num_tokens": 3}], num_labels=2)
    model.freeze("p")
    with pytest.raises(ConfigError, match="freeze every source first"):
        merge_tasks(model, "m", ["p", "q"], head_from="p")
    assert "m" not in model.tasks
    model.freeze("q")
    merged = merge_tasks(model, "m", ["p", "q"], head_from="p")
    assert all(torch.isfinite(v).all() for v in merged.deltas.state_dict().values())


def test_a_refused_fusion_leaves_its_sources_trainable_and_non_finite_settings_are_refused():
    """add_fusion froze (and folded) its sources before the fusion was checked, so a taken name or
    a bad setting left them untrainable; a NaN temperature passed every range check."""
    model = DeltaModel(tiny_backbone("bert"))
    model.add_task("a", [method_config("lora")], num_labels=2)
    for kw, match in (({"temperature": float("nan")}, "finite"), ({"attn_dim": 0}, "attn_dim"), ({}, "already exists")):
        with pytest.raises((ConfigError, TaskError), match=match):
            add_fusion(model, "f" if kw else "a", ["a"], label_names=["x", "y"], **kw)
        assert not model.task("a").frozen
    add_fusion(model, "f", ["a"], label_names=["x", "y"])
    assert model.task("a").frozen
    for bad in ({"method": "lora", "alpha": float("nan")}, {"method": "parallel", "scaling": float("inf")}):
        with pytest.raises(ConfigError, match="finite number"):
            model.add_task("t", [bad], num_labels=2)

def test_fusion_is_registered_but_not_a_method_of_its_own():
    import adapters

    assert "fusion" not in adapters.available_methods()
    assert "fusion" in adapters.available_methods(include_composite=True)
    model = DeltaModel(tiny_backbone("bert"))
    with pytest.raises(ConfigError, match="sources must name at least one task"):
        model.add_task("x", ["fusion"], num_labels=2)
