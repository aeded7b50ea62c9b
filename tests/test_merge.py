"""Merge rules over task vectors (fusion/merge.py): TIES and DARE checked by hand and by their
defining properties, and wired through merge_tasks over a task's whole delta."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import batch, method_config, tiny_backbone
from test_cli import args as cli_args
from test_cli import toy_yaml  # noqa: F401  (a fixture)
from test_fusion import _randomise

from adapters import ConfigError, DeltaModel
from continual.cli import main
from fusion import merge_tasks
from fusion.merge import dare_merge, linear_merge, magmax_merge, ties_merge


def test_ties_by_hand():
    v = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -4.0, 1.0, 0.1], [2.0, 0.0, -3.0, 0.2]])
    # trim to 2 per row: [3,0,0,2], [-2,-4,0,0], [2,0,-3,0]; signs of the sums: +, -, -, +;
    # each entry the mean of the values that agree: (3+2)/2, -4, -3, 2
    torch.testing.assert_close(ties_merge(v, torch.ones(3), 0.5), torch.tensor([2.5, -4.0, -3.0, 2.0]))
    # weights scale the vectors before the election: row 1 weighted 3 turns entry 0 negative
    torch.testing.assert_close(ties_merge(v, torch.tensor([1.0, 3.0, 1.0]), 0.5), torch.tensor([-6.0, -12.0, -3.0, 2.0]))
    # nothing kept anywhere (every row zero there) is 0, not NaN
    assert torch.isfinite(ties_merge(torch.zeros(2, 5), torch.ones(2), 0.2)).all()


def test_ties_of_agreeing_vectors_is_their_mean_and_one_vector_is_trimmed_to_density():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 50, generator=g) + 0.1  # all positive: every entry agrees
    torch.testing.assert_close(ties_merge(v, torch.ones(3), 1.0), v.mean(0))
    one = torch.randn(1, 1000, generator=g)
    kept = ties_merge(one, torch.ones(1), 0.1)
    assert int((kept != 0).sum()) == 100
    assert kept.abs().min() == 0 and one.abs()[0][kept != 0].min() >= one.abs()[0][kept == 0].max()


def test_dare_is_seeded_unbiased_and_linear_at_density_one():
    v = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(dare_merge(v, w, 1.0, 0), linear_merge(v, w))
    torch.testing.assert_close(dare_merge(v, w, 0.3, 7), dare_merge(v, w, 0.3, 7))
    assert not torch.equal(dare_merge(v, w, 0.3, 7), dare_merge(v, w, 0.3, 8))
    ones = dare_merge(torch.ones(1, 200_000), torch.ones(1), 0.3, 0)
    assert abs(float((ones != 0).float().mean()) - 0.3) < 0.01
    assert abs(float(ones.mean()) - 1.0) < 0.02 and torch.allclose(ones[ones != 0], torch.tensor(1 / 0.3))


def _two_tasks(method: str = "lora") -> DeltaModel:
    model = DeltaModel(tiny_backbone("bert"))
    for i, n in enumerate(("a", "b")):
        model.add_task(n, [method_config(method)], num_labels=2)
        _randomise(model, n, i)
        model.freeze(n)
    return model


@pytest.mark.parametrize("how", ["ties", "dare"])
def test_a_task_merged_with_itself_at_density_one_is_itself(how):
    model = _two_tasks()
    merge_tasks(model, "m", ["a", "a"], [0.5, 0.5] if how == "dare" else None, how=how, density=1.0, head_from="a")
    b = batch()
    model.eval()
    with torch.no_grad():
        model.activate("a")
        want = model(**b)
        model.activate("m")
        torch.testing.assert_close(model(**b), want)


def test_ties_trims_over_the_whole_delta_not_each_tensor():
    model = _two_tasks("bitfit")
    with torch.no_grad():  # one tensor holds the largest entries: at a low density only it survives
        big = next(iter(model.task("a").deltas.parameters()))
        big.mul_(1000)
    assert len(list(model.task("a").deltas.parameters())) > 1
    total = sum(p.numel() for p in model.task("a").deltas.parameters())
    merged = merge_tasks(model, "m", ["a"], how="ties", density=big.numel() / total, head_from="a")
    params = list(merged.deltas.parameters())
    assert (params[0] != 0).any() and all((p == 0).all() for p in params[1:])


def test_merge_tasks_wires_the_rules_over_the_concatenated_delta():
    model = _two_tasks()
    states = [dict(model.task(n).deltas.named_parameters()) for n in ("a", "b")]
    keys = list(states[0])
    vectors = torch.stack([torch.cat([s[k].detach().flatten() for k in keys]) for s in states])
    for how, rule in (("ties", lambda v: ties_merge(v, torch.ones(2), 0.3)),
                      ("dare", lambda v: dare_merge(v, torch.full((2,), 0.5), 0.3, 5))):
        merged = merge_tasks(model, how, ["a", "b"], how=how, density=0.3, seed=5, head_from="a")
        got = torch.cat([p.detach().flatten() for _, p in merged.deltas.named_parameters()])
        torch.testing.assert_close(got, rule(vectors))
    merged = merge_tasks(model, "magmax", ["a", "b"], how="magmax", head_from="a")  # default weights: MagMax's 0.5
    got = torch.cat([p.detach().flatten() for _, p in merged.deltas.named_parameters()])
    torch.testing.assert_close(got, magmax_merge(vectors, torch.full((2,), 0.5)))


def test_cat_is_the_exact_sum_of_loras_as_if_both_acted_at_once():
    """LoRA terms at a site add, so two LoRAs active together compute s_a B_a A_a + s_b B_b A_b: a
    cat merge with weights 1 must give the same logits (a linear merge of the factors does not)."""
    model = _two_tasks()
    merged = merge_tasks(model, "cat", ["a", "b"], [1.0, 1.0], how="cat", head_from="b")
    assert merged.configs[0].rank == 8 and merged.configs[0].alpha == 8.0
    b = batch()
    model.eval()
    with torch.no_grad():
        model.activate("a", "b")
        both = model(**b)
        model.activate("cat")
        torch.testing.assert_close(model(**b), both)
        merge_tasks(model, "lin", ["a", "b"], [1.0, 1.0], head_from="b")
        model.activate("lin")
        assert not torch.allclose(model(**b), both, atol=1e-3)
    avg = merge_tasks(model, "avg", ["a", "b"], how="cat", head_from="b")  # default weights: the mean update
    for key, site in avg.deltas["lora"].site_modules.items():
        want = sum(0.5 * s.scaling * s.lora_B @ s.lora_A for s in (model.task(n).deltas["lora"].site_modules[key] for n in "ab"))
        torch.testing.assert_close(site.scaling * site.lora_B @ site.lora_A, want)


def test_cat_refuses_methods_without_a_summed_form_and_ranks_above_a_layers_width():
    with pytest.raises(ConfigError, match="bitfit has no form"):
        merge_tasks(_two_tasks("bitfit"), "m", ["a", "b"], how="cat", head_from="a")
    model = _two_tasks()  # rank 4 each, on a width of 32: nine of them would need rank 36
    with pytest.raises(ConfigError, match="the cat merge of 9 sources: lora rank 36 is above the width"):
        merge_tasks(model, "m", ["a", "b"] * 4 + ["a"], how="cat", head_from="a")
    assert "m" not in model.tasks


@pytest.mark.parametrize("how, density, seed, match", [
    ("mean", None, 0, "unknown merge"), ("ties", 0.0, 0, "density"), ("ties", 1.5, 0, "density"),
    ("dare", math.nan, 0, "density"), ("linear", 0.5, 0, "no density"), ("magmax", 0.5, 0, "no density"), ("dare", 0.5, 1.5, "seed"),
])
def test_bad_merge_settings_are_refused_before_the_task_is_added(how, density, seed, match):
    model = _two_tasks()
    with pytest.raises(ConfigError, match=match):
        merge_tasks(model, "m", ["a", "b"], how=how, density=density, seed=seed, head_from="a")
    assert "m" not in model.tasks


# -- the merge command over a finished run -----------------------------------------------------------
def test_merge_command_scores_every_task_and_logs_them(toy_yaml, tiny_backbone_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    assert main(cli_args(toy_yaml, tiny_backbone_dir, out, "--tracking-uri", uri)) == 0
    capsys.readouterr()
    assert main(["merge", str(out), "--how", "ties", "--how", "dare", "--density", "0.4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split(",") for line in (out / "merge.csv").read_text().splitlines()[1:]]
    scores = {(r, t): float(v) for r, t, v in rows}
    assert sorted({r for r, _ in scores}) == ["dare", "own delta", "ties"] and len(rows) == 9
    final = json.loads((out / "results.json").read_text())["matrix"]["R"][-1]
    for j, t in enumerate("abc"):  # the own-delta column is the run's own last row, scored again
        assert scores[("own delta", t)] == pytest.approx(final[j])
    assert "ties: density=0.4; dare: density=0.4, seed=3" in printed and "its own head" in printed
    assert (out / "merge.png").stat().st_size > 1000
    client = MlflowClient(uri)
    child = client.search_runs([client.get_experiment_by_name("continual").experiment_id], "tags.kind = 'merge'")[0]
    assert child.data.metrics["b/ties"] == pytest.approx(scores[("ties", "b")])
    assert child.data.metrics["ACC/own delta"] == pytest.approx(np.mean(final))


def test_a_one_task_run_merged_by_any_rule_at_density_one_scores_as_its_own_delta(toy_yaml, tiny_backbone_dir,
                                                                                    tmp_path, capsys):
    one = tmp_path / "one.yaml"
    task = {**yaml.safe_load(toy_yaml.read_text())["tasks"][0], "name": "merged0"}  # the name a merge would take
    task["train"] = str(toy_yaml.parent / task["train"])
    one.write_text(yaml.safe_dump({"name": "one", "tasks": [task]}))
    out = tmp_path / "out"
    assert main(cli_args(one, tiny_backbone_dir, out, "--no-mlflow")) == 0

    def scores() -> dict[str, float]:
        return {r: float(v) for r, _, v in (line.split(",") for line in (out / "merge.csv").read_text().splitlines()[1:])}

    assert main(["merge", str(out), "--how", "ties", "--how", "dare", "--density", "1"]) == 0
    first = scores()
    assert list(first) == ["own delta", "ties", "dare"] and first["ties"] == first["dare"] == first["own delta"]
    assert main(["merge", str(out)]) == 0  # by default: linear, ties, dare, and cat for LoRAs
    capsys.readouterr()
    assert list(scores()) == ["own delta", "linear", "ties", "dare", "cat"]
    assert scores()["linear"] == scores()["cat"] == scores()["own delta"]
    assert main(["merge", str(out), "--how", "magmax"]) == 0  # asked for: said with its scale
    assert "magmax: scale=0.5" in capsys.readouterr().out and list(scores()) == ["own delta", "magmax"]


def test_merge_refusals_come_before_the_backbone_loads(toy_yaml, tiny_backbone_dir, tmp_path, capsys, monkeypatch):
    import continual.studies.route as route_module

    out = tmp_path / "out"
    assert main(cli_args(toy_yaml, tiny_backbone_dir, out, "--no-mlflow", "--strategy", "seq-delta")) == 0

    def loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the refusal")

    monkeypatch.setattr(route_module, "load_run_model", loading)
    capsys.readouterr()
    for extra, message in ((["--how", "ties", "--how", "ties"], "given more than once"),
                           (["--density", "0"], "density must be in (0, 1]"),
                           (["--how", "linear", "--density", "0.5"], "no merge rule here uses one"),
                           ([], "holds tasks ['a', 'a-shared_delta'")):
        assert main(["merge", str(out), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_merge_and_transfer_score_as_the_run_scored_its_matrix(toy_yaml, tiny_backbone_dir, tmp_path, capsys,
                                                                monkeypatch):
    """Both studies score the run's own deltas again; in fp32 at batch 64 they could differ from
    a bf16 run's matrix (a flipped generated answer). They now use the precision and batch the rows
    record; a run that records none is scored in fp32 at batch 64, and the output says which."""
    import continual.studies.merge as merge_module
    import continual.studies.transfer as transfer_module
    from continual.rundir import sealed
    from continual.training import evaluate

    out = tmp_path / "out"
    assert main(cli_args(toy_yaml, tiny_backbone_dir, out, "--no-mlflow", "--precision", "bf16", "--batch-size", "4")) == 0
    seen = []

    def spy(model, task, loader, *a, precision="fp32", **kw):
        seen.append((precision, loader.batch_size))
        return evaluate(model, task, loader, *a, precision=precision, **kw)

    for module in (merge_module, transfer_module):
        monkeypatch.setattr(module, "evaluate", spy)
    capsys.readouterr()
    assert main(["merge", str(out), "--how", "linear"]) == 0
    merged = capsys.readouterr()
    assert main(["transfer", str(out), "--no-progress"]) == 0
    transferred = capsys.readouterr()
    assert "merge: scoring" in merged.err and "transfer: scoring" not in transferred.err  # a bar, and --no-progress
    printed = merged.out + transferred.out
    assert set(seen) == {("bf16", 8)} and printed.count("as the run scored its matrix (bf16, batch 8)") == 2
    # route embeds and serves in the run's precision and batch too (it used fp32 at batch 64), with a bar
    import fusion.routing as routing_module

    used, real_embed, real_names = [], routing_module.embed, routing_module._predict_names

    def embed_spy(model, batches, precision="fp32"):
        used.append(("embed", precision, max(len(b["input_ids"]) for b in batches)))
        return real_embed(model, batches, precision)

    def names_spy(mixed, batches, slots, labels):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        used.append(("serve", dtype, max(len(b["input_ids"]) for b in batches)))
        return real_names(mixed, batches, slots, labels)

    monkeypatch.setattr(routing_module, "embed", embed_spy)
    monkeypatch.setattr(routing_module, "_predict_names", names_spy)
    assert main(["route", str(out), "--router", "prototype", "--router", "linear"]) == 0
    routed = capsys.readouterr()
    assert "route: embedding and scoring" in routed.err
    assert "embedded and scored as the run scored its matrix (bf16, batch 8)" in routed.out
    assert {u[1] for u in used if u[0] == "embed"} == {"bf16"} and {u[1] for u in used if u[0] == "serve"} == {torch.bfloat16}
    assert max(u[2] for u in used) == 8  # (and the linear router still fits: by gradient descent, outside the serving's no_grad)
    results = json.loads((out / "results.json").read_text())
    own = [float(line.split(",")[2]) for line in (out / "merge.csv").read_text().splitlines()[1:4]]
    assert own == [round(v, 6) for v in results["matrix"]["R"][-1]]  # the same numbers, not close ones
    for rows, says in ((1, "not all its rows record"), (len(results["steps"]), "it does not record how it scored")):
        for step in results["steps"][:rows]:  # begun before rows recorded how they were scored (and resumed)
            step.pop("scored_with", None)
        (out / "results.json").write_text(json.dumps(sealed({k: v for k, v in results.items() if k != "checksum"})))
        seen.clear()
        assert main(["merge", str(out), "--how", "linear"]) == 0
        assert set(seen) == {("fp32", 64)} and f"in fp32 at batch 64 ({says}" in capsys.readouterr().out
    results["steps"][0]["scored_with"] = {"precision": "fp32", "batch": 8}
    for step in results["steps"][1:]:
        step["scored_with"] = {"precision": "bf16", "batch": 8}  # resumed elsewhere, in another precision
    (out / "results.json").write_text(json.dumps(sealed({k: v for k, v in results.items() if k != "checksum"})))
    assert main(["transfer", str(out), "--no-progress"]) == 0
    assert "in fp32 at batch 64 (its rows were scored in different precisions" in capsys.readouterr().out
    used.clear()
    assert main(["route", str(out), "--router", "prototype", "--no-progress"]) == 0
    routed = capsys.readouterr()
    assert "in fp32 at batch 64 (its rows were scored in different precisions" in routed.out and "route:" not in routed.err
    assert {u[1] for u in used} == {"fp32", torch.float32}
