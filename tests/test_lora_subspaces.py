"""o-lora and inflora on a tiny BERT: O-LoRA's subspaces near-orthogonal after training, InfLoRA's
old tasks' outputs unchanged to a stated tolerance, the designed subspace itself, refusals, and a
kill + resume equal to the uninterrupted run for each."""

import numpy as np
import pytest
import torch

from conftest import FAST, assert_same_matrices, killed_and_resumed, tiny_t5, toy_generative_stream, toy_stream
from continual import StreamLogger, TrainConfig, make_strategy, run_stream
from streams import TaskStream
from continual.strategies.inflora import design, grow
from continual.strategies.o_lora import orthogonality, overlap
from continual.strategies.summed_lora import lora_sites

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15, "lr": 3e-2})
LORA = [{"method": "lora", "rank": 4}]


class Rows(StreamLogger):
    """After each row: every task's lora_A per site, task a's logits on fixed inputs, and (InfLoRA) the basis."""

    def __init__(self, model, strategy):
        self.model, self.strategy, self.rows = model, strategy, []
        self.inputs = model.tokenizer(["apple river music", "stone apple cloud", "music tree"], return_tensors="pt",
                                      padding=True)

    def log_matrix(self, row, tasks, R_row, F1_row, summary, A_row=None):
        m = self.model
        with torch.no_grad(), m.acting(*self.strategy.active("a")):
            logits = m(**self.inputs).float().clone()
        self.rows.append({"A": {t: {k: s.lora_A.detach().clone() for k, s in lora_sites(m, t).items()} for t in m.tasks},
                          "logits_a": logits,
                          "basis": {k: v.clone() for k, v in getattr(self.strategy, "basis", {}).items()}})


def run(text_model, tmp_path, name, **options):
    model = text_model()
    strategy = make_strategy(name, LORA, **options)
    rows = Rows(model, strategy)
    result = run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / f"{name}{sorted(options.items())}", loggers=[rows])
    return model, strategy, rows.rows, result


def mean_overlap(A: dict, first: str, second: str) -> float:
    return float(np.mean([overlap(A[first][k], A[second][k]) for k in A[first]]))


def test_orthogonality_term_is_zero_for_orthogonal_rows_and_grows_with_shared_ones():
    q = torch.linalg.qr(torch.randn(16, 16)).Q
    a, b = {"s": q[:4]}, {"s": q[4:8]}
    assert float(orthogonality(b, [a])) < 1e-10 and overlap(a["s"], b["s"]) < 1e-10
    assert float(orthogonality(a, [a])) == pytest.approx(4.0, rel=1e-5) and overlap(a["s"], a["s"]) == pytest.approx(1.0)
    mixed = {"s": torch.cat([q[:2], q[4:6]])}
    assert overlap(a["s"], mixed["s"]) == pytest.approx(0.5, rel=1e-5)


def test_o_lora_subspaces_end_near_orthogonal_and_all_loras_act(text_model, tmp_path):
    model, strategy, rows, _ = run(text_model, tmp_path, "o-lora", orth_lambda=50.0)
    *_, plain, _ = run(text_model, tmp_path, "o-lora", orth_lambda=0.0)
    A, A_plain = rows[-1]["A"], plain[-1]["A"]
    for first, second in (("a", "b"), ("a", "c"), ("b", "c")):
        # the same seeds: without the term the subspaces share what random 4-dim subspaces of 32 do
        assert mean_overlap(A, first, second) < 0.25 * mean_overlap(A_plain, first, second), (first, second)
    assert strategy.active("a") == ("b", "c", "a") and strategy.active("c") == ("a", "b", "c")
    # earlier LoRAs are frozen: a's A after c equals a's A after a
    for k, v in rows[0]["A"]["a"].items():
        assert torch.equal(v, A["a"][k])
    # every trained LoRA acts: dropping b's changes a's answer
    with torch.no_grad(), model.acting("c", "a"):
        without_b = model(**model.tokenizer(["apple river music"], return_tensors="pt")).float()
    with torch.no_grad(), model.acting(*strategy.active("a")):
        with_b = model(**model.tokenizer(["apple river music"], return_tensors="pt")).float()
    assert not torch.allclose(without_b, with_b)


def test_designed_rows_avoid_the_basis_and_the_basis_holds_its_threshold():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)
    cov = x.t() @ x
    basis = grow(cov, None, 0.9)
    inside = float(torch.trace(basis.t() @ cov @ basis) / torch.trace(cov))
    assert inside >= 0.9 and basis.shape[1] < 12
    assert torch.allclose(basis.t() @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10)
    y = torch.randn(200, 12, generator=g, dtype=torch.float64)
    rows = design(y.t() @ y, basis, 3)
    assert float((rows @ basis).abs().max()) < 1e-10  # nothing of an earlier input gets through
    assert torch.allclose(rows @ rows.t(), torch.eye(3, dtype=torch.float64), atol=1e-10)
    full = grow(cov, None, 1.0)
    assert full.shape[1] == 12 and not design(y.t() @ y, full, 3).any()  # no free direction left: zero rows


def test_inflora_keeps_old_outputs_and_trains_only_the_up_projection(text_model, tmp_path):
    model, strategy, rows, result = run(text_model, tmp_path, "inflora", threshold=0.99)
    *_, plain, _ = run(text_model, tmp_path, "o-lora", orth_lambda=0.0)  # the same LoRAs summed, A not designed
    for key, m in rows[0]["basis"].items():  # b's and c's A avoid what a's inputs occupy
        for t in ("b", "c"):
            assert float((rows[-1]["A"][t][key].double() @ m).abs().max()) < 1e-5, (t, key)

    def drift(rs):  # relative change of task a's logits from after a to after c
        return float((rs[-1]["logits_a"] - rs[0]["logits_a"]).norm() / rs[0]["logits_a"].norm())

    assert drift(rows) < 0.05 and drift(rows) < 0.25 * drift(plain), (drift(rows), drift(plain))
    # only B trained: every task's A still has the designed orthonormal (or zero) rows
    for t, sites in rows[-1]["A"].items():
        for a in sites.values():
            live = a.any(dim=1).double()
            assert torch.allclose(a.double() @ a.double().t(), torch.diag(live), atol=1e-5), t
    lora_b = sum(s.lora_B.numel() for s in lora_sites(model, "a").values())
    assert result.steps[0]["trainable_params"]["a"] == lora_b + model.task("a").head_parameters()


@pytest.mark.parametrize("name", ["o-lora", "inflora"])
def test_kill_and_resume_equal_the_uninterrupted_run(text_model, tmp_path, name):
    go = lambda d, **kw: run_stream(toy_stream(), text_model(), make_strategy(name, LORA), CONFIG,  # noqa: E731
                                    tmp_path / d, **kw)
    full, resumed = killed_and_resumed(go)
    assert_same_matrices(resumed, full)


def test_refuse_methods_that_are_not_lora_and_bad_options():
    for name in ("o-lora", "inflora"):
        with pytest.raises(ValueError, match="must be lora"):
            make_strategy(name, ["bottleneck"])
    with pytest.raises(ValueError, match="orth_lambda"):
        make_strategy("o-lora", LORA, orth_lambda=-1)
    with pytest.raises(ValueError, match="threshold"):
        make_strategy("inflora", LORA, threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1"):
        make_strategy("inflora", LORA, threshold=1)  # the first task's basis would take the whole space


def test_a_task_left_no_free_direction_is_said(text_model, tmp_path, capsys):
    strategy = make_strategy("inflora", LORA)
    strategy.threshold = 1.0  # (refused at the edge) the basis takes every direction after task a
    config = TrainConfig(**{**FAST, "max_steps": 2, "eval_every": 2})
    run_stream(toy_stream(), text_model(), strategy, config, tmp_path / "full")
    out = capsys.readouterr().out
    assert "task a (inflora)" not in out
    for t in ("b", "c"):
        assert f"task {t} (inflora): the earlier tasks' input subspace leaves no free direction at" in out


@pytest.mark.parametrize("name", ["o-lora", "inflora"])
def test_generative_streams_on_a_decoder_and_t5(name, lm_model, word_tokenizer, tmp_path):
    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2])
    config = TrainConfig(**{**FAST, "max_steps": 20, "lr": 3e-2, "max_length": 32, "eval_every": 10})
    for label, model in (("llama", lm_model()), ("t5", tiny_t5(word_tokenizer))):
        res = run_stream(stream, model, make_strategy(name, LORA), config, tmp_path / label)
        assert not np.isnan(res.matrix.R[-1]).any() and not np.isnan(res.matrix.A[-1]).any(), label
