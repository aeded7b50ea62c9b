"""replay, A-GEM, DER++, I-LoRA, EWC, MAS, SI, LwF, MagMax, MIGU and LAMOL (generative streams) on a shared delta, and the task-agnostic matrix, on tiny models.

Each strategy's own property (replay's memory balanced and restored on resume; EWC's penalty zero
at the anchor and growing with the move; LwF's loss zero when the new delta equals the old), a
kill + resume equal to the uninterrupted run for each, and R_agnostic equal to R on one task."""

import numpy as np
import pytest
import torch

from conftest import FAST, KillAt, assert_same_matrices, killed_and_resumed, toy_generative_stream, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.agnostic import AgnosticScorer, function_key
from continual.strategies import SHARED
from continual.strategies.ewc import ewc_penalty
from continual.strategies.lwf import OLD, distillation
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 40})
GEN = TrainConfig(**{**FAST, "max_steps": 40, "lr": 3e-2, "max_length": 32, "eval_every": 20})
LORA = [{"method": "lora", "rank": 4}]
OPTIONS = {"replay": {"memory_size": 30}, "agem": {"memory_size": 30}, "gem": {"memory_size": 30}, "ogd": {"samples": 8}, "der": {"memory_size": 30}, "i-lora": {"memory_size": 30}, "ewc": {"fisher_samples": 8}, "mas": {"importance_samples": 8}, "si": {}, "lwf": {}, "magmax": {}, "migu": {}, "lamol": {"gamma": 0.5}}


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_move():
    anchor = {"w": torch.randn(5)}
    fisher = {"w": torch.rand(5) + 0.1}
    at = ewc_penalty({"w": anchor["w"].clone()}, anchor, fisher, 100.0)
    moves = [ewc_penalty({"w": anchor["w"] + s}, anchor, fisher, 100.0) for s in (0.1, 0.2, 0.4)]
    assert at.item() == 0.0
    assert moves[0] < moves[1] < moves[2]
    assert moves[1].item() == pytest.approx(4 * moves[0].item(), rel=1e-5)  # quadratic in the move
    assert ewc_penalty({"w": anchor["w"] + 0.1}, anchor, {"w": torch.zeros(5)}, 100.0).item() == 0.0  # F = 0: free


def test_lwf_distillation_is_zero_when_nothing_moved():
    t = torch.randn(6, 4)
    assert distillation(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation(t + torch.randn(6, 4), t, 2.0).item() > 0


def test_lwf_term_is_zero_while_the_delta_equals_its_copy(text_model, tmp_path):
    """Trained on task a, then the term for task b at its start (delta = copy): zero; moved: not."""
    from continual.scoring import TokenisedTasks

    model, stream = text_model(), toy_stream()
    lwf = make_strategy("lwf", LORA)
    data = TokenisedTasks(model.tokenizer, 16, 32)
    for task in stream[:2]:
        lwf.prepare(model, task)
        if task.name == "a":
            lwf.train(model, [task], CONFIG, data, None)
            lwf.finish(model, task)
    b = stream[1]
    term = lwf.loss_term(model, b, CONFIG, data)
    assert OLD in model.tasks
    batch = model.tokenizer(list(b.train["text"][:8]), padding=True, return_tensors="pt")
    model.activate(*lwf.active("b"))
    with torch.no_grad():
        logits = model(**batch)
        assert term(dict(batch), None, logits).item() == pytest.approx(0.0, abs=1e-5)
        for p in model.task(SHARED).deltas.parameters():
            p.add_(0.5 * torch.randn_like(p))
        logits = model(**batch)
        assert term(dict(batch), None, logits).item() > 1e-4


def test_replay_memory_is_balanced_seeded_and_shrinks_by_cutting():
    replay = make_strategy("replay", LORA, memory_size=10)
    t = toy_stream().tasks
    replay._store(t[0], 50, seed=1)
    first = replay.memory["a"].clone()
    assert len(first) == 10
    replay._store(t[1], 40, seed=2)
    replay._store(t[2], 40, seed=3)
    assert [len(replay.memory[n]) for n in "abc"] == [4, 3, 3]  # even split, remainder to the earliest
    assert torch.equal(replay.memory["a"], first[:4])  # a prefix of what it was
    again = make_strategy("replay", LORA, memory_size=10)
    again._store(t[0], 50, seed=1)
    assert torch.equal(again.memory["a"], first)  # seeded


@pytest.mark.parametrize("name", ["replay", "der", "magmax", "i-lora", "migu", "agem", "gem", "ogd", "ewc", "mas", "si", "lwf"])
def test_kill_and_resume_equal_the_uninterrupted_run(name, text_model, tmp_path):
    go = lambda d, **kw: run_stream(toy_stream(), text_model(), make_strategy(name, LORA, **OPTIONS[name]), CONFIG,  # noqa: E731
                                    tmp_path / d, **kw)
    full, resumed = killed_and_resumed(go)
    assert_same_matrices(resumed, full)
    assert not np.isnan(np.diag(full.matrix.A)).any() and not np.isnan(full.matrix.A[-1]).any()


@pytest.mark.parametrize("name, passes", [("ewc", 2), ("mas", 2), ("si", 3)])
def test_the_importance_pass_after_the_streams_last_task_is_skipped(name, passes, text_model, tmp_path, monkeypatch):
    """EWC's and MAS's importance costs a pass over data that no task after the last would use;
    SI's is read from training and is kept for every task."""
    from continual.strategies.ewc import EWC

    strategy, calls = make_strategy(name, LORA, **OPTIONS[name]), []
    real = type(strategy).task_importance
    monkeypatch.setattr(type(strategy), "task_importance", lambda self, model, task, *a: (calls.append(task.name),
                                                                                          real(self, model, task, *a))[-1])
    assert isinstance(strategy, EWC)
    run_stream(toy_stream(), text_model(), strategy, TrainConfig(**{**FAST, "max_steps": 10, "eval_every": 5}), tmp_path / "r")
    assert calls == ["a", "b", "c"][:passes] and strategy.anchor  # the anchor is the last task's either way


def test_replay_restores_its_memory_exactly_on_resume(text_model, tmp_path):
    from safetensors.torch import load_file

    full = run_stream(toy_stream(), text_model(), make_strategy("replay", LORA, memory_size=30), CONFIG, tmp_path / "f")
    saved = load_file(str(next((tmp_path / "f").glob("state-step*.safetensors"))))
    assert [len(saved[f"replay.{i}"]) for i in range(3)] == [10, 10, 10]
    strategy = make_strategy("replay", LORA, memory_size=30)
    with pytest.raises(KeyboardInterrupt):
        run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / "k", loggers=[KillAt(2)])
    resumed_strategy = make_strategy("replay", LORA, memory_size=30)
    resumed = run_stream(toy_stream(), text_model(), resumed_strategy, CONFIG, tmp_path / "k", resume=True)
    for i, name in enumerate("abc"):
        assert torch.equal(resumed_strategy.memory[name], saved[f"replay.{i}"])
    np.testing.assert_array_equal(resumed.matrix.R, full.matrix.R)


def test_generative_stream_trains_with_each_method(lm_model, tmp_path):
    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2])
    for name in ("replay", "agem", "gem", "ogd", "der", "i-lora", "ewc", "mas", "si", "lwf", "magmax", "migu", "lamol"):
        res = run_stream(stream, lm_model(), make_strategy(name, LORA, **OPTIONS[name]), GEN, tmp_path / name)
        assert not np.isnan(res.matrix.R[-1]).any() and not np.isnan(res.matrix.A[-1]).any()
        # one shared delta and the shared LM head: routing cannot change a generative answer
        np.testing.assert_allclose(res.matrix.A[-1], res.matrix.R[-1])


@pytest.mark.parametrize("strategy", ["per-task", "seq-delta"])
def test_agnostic_equals_task_aware_on_one_task(strategy, text_model, tmp_path):
    stream = TaskStream("one", toy_stream().tasks[:1])
    res = run_stream(stream, text_model(), make_strategy(strategy, LORA), CONFIG, tmp_path / "r")
    assert res.matrix.A[0, 0] == res.matrix.R[0, 0] and res.matrix.routing[0] == 1.0
    assert res.metrics["ACC_agnostic"] == res.metrics["ACC"]


def test_per_task_agnostic_scores_follow_the_router(text_model, tmp_path):
    """Every example answered by its routed task's delta and head: recomputed here from scratch."""
    stream = toy_stream()
    model = text_model()
    res = run_stream(stream, model, make_strategy("per-task", LORA), CONFIG, tmp_path / "r")
    strategy = make_strategy("per-task", LORA)
    from continual.scoring import TokenisedTasks

    fresh = AgnosticScorer(model, TokenisedTasks(model.tokenizer, CONFIG.max_length, 32), strategy.active)
    for t in stream:
        fresh.add_task(t)
    scores, routing = fresh.row(stream.tasks, "")
    np.testing.assert_allclose(scores, res.matrix.A[-1])
    assert routing == res.matrix.routing[-1]


def test_function_key_ignores_names_but_not_weights(text_model):
    model = text_model()
    for name in "ab":
        torch.manual_seed(0)
        model.add_task(name, LORA, label_names=["no", "yes"])
    assert function_key(model, ("a",), "x") == function_key(model, ("b",), "x")  # same weights: same answers
    assert function_key(model, ("a",), "x") != function_key(model, ("a",), "y")  # another backbone
    with torch.no_grad():
        next(model.task("b").parameters()).add_(1.0)
    assert function_key(model, ("a",), "x") != function_key(model, ("b",), "x")


def test_function_key_of_a_generative_route_ignores_the_answer_words(lm_model):
    """Under one shared delta two generative tasks with other answer words answer alike (the LM
    head, the same delta): one key, so a routed example reuses the task-aware score instead of
    being generated again in another batch (where bf16 rounding flipped an answer: A != R). Two
    classifiers with other label names still differ."""
    model = lm_model()
    model.add_task(SHARED, LORA)
    model.add_task("sent", [], generative=True, label_names=["negative", "positive"])
    model.add_task("spam", [], generative=True, label_names=["ham", "spam"])
    assert function_key(model, (SHARED, "sent"), "x") == function_key(model, (SHARED, "spam"), "x")
    for name, labels in (("c1", ["negative", "positive"]), ("c2", ["ham", "spam"])):
        torch.manual_seed(0)  # the same head weights: only the label names differ
        model.add_task(name, [], label_names=labels)
    assert function_key(model, (SHARED, "c1"), "x") != function_key(model, (SHARED, "c2"), "x")


def test_agnostic_matrix_round_trips_and_old_results_still_load():
    from continual.metrics import AccuracyMatrix

    m = AccuracyMatrix(["a", "b"])
    for row in range(2):
        for j in range(row + 1):
            m.update(row, j, 0.9 - 0.1 * row, 0.8)
    m.update_agnostic(0, [0.7], 1.0)
    m.update_agnostic(1, [0.5, 0.6], 0.75)
    back = AccuracyMatrix.from_dict(m.to_dict())
    np.testing.assert_array_equal(back.A, m.A)
    r = back.result()
    assert r["ACC_agnostic"] == pytest.approx(0.55) and r["BWT_agnostic"] == pytest.approx(-0.2)
    assert r["routing_accuracy"] == 0.75 and "FWT_agnostic" not in r
    old = {k: v for k, v in m.to_dict().items() if k not in ("R_agnostic", "routing")}  # saved before A existed
    assert np.isnan(AccuracyMatrix.from_dict(old).result()["ACC_agnostic"])


def test_make_strategy_reads_method_specs_and_checks_options_by_name():
    """One spec string was read letter by letter ("unknown delta method 'l'"), None failed as a
    "bad option", and per-task-fusion's fusion options failed with a traceback after the first task."""
    assert [(m.method, m.rank) for m in make_strategy("per-task", "lora:rank=4").methods] == [("lora", 4)]
    assert [m.method for m in make_strategy("per-task", "lora+bitfit").methods] == ["lora", "bitfit"]
    assert make_strategy("per-task", ["lora:rank=2"]).methods[0].rank == 2
    assert make_strategy("per-task", None).methods == make_strategy("per-task").methods
    with pytest.raises(ValueError, match=r"strategy 'ewc': unknown option\(s\) \['lambda'\]; its options: ewc_lambda, fisher_samples"):
        make_strategy("ewc", ["lora"], **{"lambda": 3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tempreature'\] for method 'fusion'"):
        make_strategy("per-task-fusion", ["lora"], tempreature=2)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        make_strategy("per-task-fusion", ["lora"], temperature=-1)
    with pytest.raises(ValueError, match="'sources' is not an option"):
        make_strategy("per-task-fusion", ["lora"], sources=["a"])
    with pytest.raises(ValueError, match=r"per-task-fusion: \['prompt'\] cannot be fused"):  # before anything loads
        make_strategy("per-task-fusion", ["prompt"])
    for bad in (-1e-5, float("nan"), 0, 1e38):  # ascent, a NaN backbone, nothing, an overflowing step
        with pytest.raises(ValueError, match="seq-ft: backbone_lr must be a number > 0 and <= 100"):
            make_strategy("seq-ft", backbone_lr=bad)
    # a method given to a strategy that trains no delta was dropped without a word (seq-ft "with LoRA"
    # fine-tuned the whole backbone)
    for name in ("seq-ft", "avalanche-naive"):
        with pytest.raises(ValueError, match=f"{name} fine-tunes the whole backbone and trains no delta.*use seq-delta"):
            make_strategy(name, ["lora"])
    assert make_strategy("seq-ft").methods == [] and make_strategy("seq-delta").methods[0].method == "bottleneck"


def test_a_strategy_without_methods_gets_its_own_default(capsys):
    """``--strategy inflora`` with no --method was refused ("its methods must be lora ...;
    ['bottleneck'] are not"): the library's default replaced the strategy's own. A strategy that
    names a default method gets it; the others the library's."""
    for name, method in (("o-lora", "lora"), ("inflora", "lora"), ("prompt-pool", "prompt_pool"), ("coda-prompt", "coda_prompt"), ("dual-prompt", "dual_prompt"),
                         ("progressive-prompts", "prompt"), ("per-task", "bottleneck"), ("ewc", "bottleneck")):
        assert [m.method for m in make_strategy(name).methods] == [method], name
    assert make_strategy("progressive-prompts").methods[0].num_tokens == 20  # the paper's length on BERT
    from continual.cli import main

    assert main(["list", "strategies"]) == 0  # `list` says which strategies default to another method
    shown = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "[default --method lora]" in shown["inflora"] and "[default --method prompt_pool]" in shown["prompt-pool"]
    assert "default --method" not in shown["per-task"] and "default --method" not in shown["seq-ft"]


def test_ewc_fisher_under_fp16_is_estimated_in_fp32(text_model):
    """One example's gradients, unscaled, underflow in fp16: the Fisher is computed in fp32 there."""
    from continual.scoring import TokenisedTasks

    model, task = text_model(), toy_stream()[0]
    ewc = make_strategy("ewc", LORA, fisher_samples=8)
    ewc.prepare(model, task)
    model.activate(*ewc.active(task.name))  # as after training: the shared delta trainable
    train = TokenisedTasks(model.tokenizer, 16, 32)(task)["train"]
    fp32, fp16 = (ewc.estimate_fisher(model, task, train, TrainConfig(**{**FAST, "precision": p})) for p in ("fp32", "fp16"))
    assert any(v.abs().sum() > 0 for v in fp32.values())
    assert all(torch.equal(fp16[k], fp32[k]) for k in fp32)


@pytest.mark.parametrize("name", ["replay", "agem", "gem", "der", "i-lora"])
def test_a_memory_too_small_for_every_earlier_task_is_refused_before_the_run(name, text_model, tmp_path):
    with pytest.raises(ValueError, match=f"{name}: memory_size must be an integer >= 1, got None"):
        make_strategy(name, LORA, memory_size=None)  # (memory_size=null on the command line: a TypeError mid-run)
    with pytest.raises(ValueError, match=f"{name}: memory_size=1 cannot keep one example of each earlier task: the "
                                         r"stream's last task trains with 2 before it; use memory_size >= 2"):
        run_stream(toy_stream(), text_model(), make_strategy(name, LORA, memory_size=1), CONFIG, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    make_strategy(name, LORA, memory_size=2).check_stream(toy_stream(), text_model())  # one example each: runs


@pytest.mark.parametrize("name, reserved", [("seq-delta", SHARED), ("lwf", OLD), ("i-lora", "ilora_slow"),
                                            ("per-task-fusion", "c_fusion")])
def test_a_reserved_task_name_is_refused_before_anything_trains(name, reserved, text_model, tmp_path):
    """A strategy's own task's name given to the stream's last task: refused before the first task
    trains (when the check waited for that task's turn, two tasks trained first)."""
    import dataclasses

    a, b, c = toy_stream().tasks
    stream = TaskStream("reserved", [a, b, dataclasses.replace(c, name=reserved)])
    with pytest.raises(ValueError, match=f"{reserved!r}.* reserved by the {name} strategy|reserved by the {name} strategy; "
                                         f"rename {reserved!r}"):
        run_stream(stream, text_model(), make_strategy(name, LORA), CONFIG, tmp_path / "r")
    assert not (tmp_path / "r").exists()
