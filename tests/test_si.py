"""si (Synaptic Intelligence on a shared delta): the path integral and importance against the
paper's formulas on hand-made steps, the penalty's gradient taken out of g, and a real stream."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import SHARED
from continual.strategies.si import SI

LORA = [{"method": "lora", "rank": 4}]


def walk(si, shared, steps):
    """Run SI's hook over hand-made steps: each (gradient, move) sets p.grad, calls the hook, moves p."""
    track = si.grad_change(None, None, None, None)
    for g, move in steps:
        shared["w"].grad = g.clone()
        track([shared["w"]])
        with torch.no_grad():
            shared["w"].add_(move)


def test_importance_is_the_damped_path_integral(monkeypatch):
    shared = {"w": torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0, 3.0]))}
    monkeypatch.setattr(SI, "shared_params", staticmethod(lambda model: shared))
    si = make_strategy("si", LORA, si_lambda=2.0, xi=0.5)
    gs = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([2.0, 1.0, -1.0, 0.0]), torch.tensor([9.0, 9.0, 9.0, 9.0])]
    moves = [torch.tensor([-0.1, 0.2, -0.3, 0.0]), torch.tensor([-0.2, -0.1, 0.4, 0.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])]
    walk(si, shared, list(zip(gs, moves)))
    omega = -(gs[0] * moves[0] + gs[1] * moves[1])  # the last step's move is never seen by a later gradient
    total = moves[0] + moves[1] + moves[2]
    expected = (omega / (total ** 2 + 0.5)).clamp_min(0)
    got = si.task_importance(None, None, None, None)["w"]
    torch.testing.assert_close(got, expected)
    assert got[0] > 0 and got[3] == 0  # moved down a falling loss: important; never pushed: free
    # an omega below zero (moves that raised the loss) gives no importance
    si2 = make_strategy("si", LORA, xi=0.5)
    walk(si2, shared, [(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.1, 0.1, 0.1, 0.1])),
                       (torch.zeros(4), torch.zeros(4))])
    assert torch.equal(si2.task_importance(None, None, None, None)["w"], torch.zeros(4))


def test_the_penalty_gradient_is_taken_out_and_an_overflowed_step_adds_nothing(monkeypatch):
    shared = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    monkeypatch.setattr(SI, "shared_params", staticmethod(lambda model: shared))
    si = make_strategy("si", LORA, si_lambda=3.0, xi=1.0)
    si.fisher, si.anchor = {"w": torch.tensor([0.5, 2.0])}, {"w": torch.tensor([0.0, 2.5])}
    task_g = torch.tensor([1.0, -1.0])
    penalty_g = 2 * 3.0 * si.fisher["w"] * (shared["w"].detach() - si.anchor["w"])  # d/dθ of c·Σ Ω (θ − θ*)²
    move = torch.tensor([-0.1, 0.1])
    walk(si, shared, [(task_g + penalty_g, move), (torch.tensor([float("inf"), float("nan")]), torch.zeros(2)),
                      (torch.zeros(2), torch.zeros(2))])
    expected = (-(task_g * move) / (move ** 2 + 1.0)).clamp_min(0)
    torch.testing.assert_close(si.task_importance(None, None, None, None)["w"], expected)
    # and the penalty is c · Σ Ω (θ − θ*)²
    term = si.loss_term(None, None, None, None)
    by_hand = 3.0 * (si.fisher["w"] * (shared["w"].detach() - si.anchor["w"]) ** 2).sum()
    assert term(None, None, None).item() == pytest.approx(by_hand.item())


def test_a_real_stream_anchors_the_delta_it_trained(text_model, tmp_path):
    si = make_strategy("si", LORA)
    res = run_stream(toy_stream(), text_model(), si, TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15}), tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    omega = torch.cat([v.reshape(-1) for v in si.fisher.values()])
    assert (omega >= 0).all() and (omega > 0).float().mean() > 0.5  # most of the trained LoRA mattered
    assert not si.start and not si.path  # the per-task trackers are cleared
    assert si.describe()["si_lambda"] == 1.0 and "ewc_lambda" not in si.describe()


def test_bad_options_are_refused():
    for key, bad, what in (("si_lambda", -1, "a finite number >= 0"), ("xi", 0, "a finite number > 0"),
                           ("xi", float("nan"), "a finite number > 0")):
        with pytest.raises(ValueError, match=f"si: {key} must be {what}"):
            make_strategy("si", LORA, **{key: bad})
