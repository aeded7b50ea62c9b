"""ogd (Orthogonal Gradient Descent on a shared delta): the kept directions, the projection, the
gold logit, and in a real stream every step's gradient orthogonal to every kept direction."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import ogd as ogd_module
from continual.strategies.ogd import DROP, add_direction, gold_logit, project_out

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15})
LORA = [{"method": "lora", "rank": 4}]


def test_kept_directions_are_orthonormal_and_span_what_was_added():
    gen = torch.Generator().manual_seed(0)
    added = [torch.randn(12, generator=gen) for _ in range(4)]
    basis = torch.zeros(0, 12)
    for g in added:
        basis = add_direction(basis, g)
    assert basis.shape == (4, 12)
    assert torch.allclose(basis @ basis.T, torch.eye(4), atol=1e-6)
    for g in added:  # each added gradient lies in their span
        assert torch.allclose(basis.T @ (basis @ g), g, atol=1e-5)
    same = add_direction(basis, 2 * added[0] - added[3])  # nothing new: not kept
    assert same is basis
    assert add_direction(basis, added[1] + DROP * 0.1 * torch.randn(12, generator=gen)) is basis
    assert add_direction(basis, torch.zeros(12)) is basis
    assert add_direction(basis, torch.full((12,), float("nan"))) is basis


def test_projection_leaves_no_part_along_the_kept_directions():
    gen = torch.Generator().manual_seed(1)
    params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2)]
    basis = torch.zeros(0, 19)
    for _ in range(3):
        basis = add_direction(basis, torch.randn(19, generator=gen))
    full = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen), torch.randn(2, generator=gen)]
    g = torch.cat([t.reshape(-1) for t in full])
    project_out(full, params, basis)
    after = torch.cat([t.reshape(-1) for t in full])
    assert (basis @ after).abs().max() < 1e-5 * g.norm()  # no part along any kept direction
    assert torch.allclose(after, g - basis.T @ (basis @ g), atol=1e-6)  # and the least change that does it
    # a parameter without a gradient counts as zero and does not move: the others as if it were zero
    grads = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen), None]
    zero = torch.cat([grads[0].reshape(-1), grads[1], torch.zeros(2)])
    project_out(grads, params, basis)
    assert grads[2] is None
    expected = zero - basis.T @ (basis @ zero)
    assert torch.allclose(torch.cat([grads[0].reshape(-1), grads[1]]), expected[:17], atol=1e-6)
    inside = [basis[0, :12].reshape(3, 4).clone(), basis[0, 12:17].clone(), basis[0, 17:].clone()]
    project_out(inside, params, basis)  # a kept direction itself: nothing is left
    assert all(t.abs().max() < 1e-6 for t in inside)
    outside = torch.randn(19, generator=gen)
    outside = outside - basis.T @ (basis @ outside)
    kept = [outside[:12].reshape(3, 4).clone(), outside[12:17].clone(), outside[17:].clone()]
    project_out(kept, params, basis)  # orthogonal already: unchanged
    assert torch.allclose(torch.cat([t.reshape(-1) for t in kept]), outside, atol=1e-6)
    empty = [g.clone() if g is not None else None for g in grads]
    project_out(empty, params, torch.zeros(0, 19))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(empty, grads))


def test_gold_logit_of_a_classifier_and_of_a_generated_answer():
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.5, 0.1, 3.0]])
    assert gold_logit(logits, torch.tensor([1, 2])) == pytest.approx(4.0)
    lm = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    labels = torch.tensor([[-100, 2, 3], [-100, -100, 0]])  # answer tokens at (0,1), (0,2), (1,2)
    assert gold_logit(lm, labels) == pytest.approx((lm[0, 1, 2] + lm[0, 2, 3] + lm[1, 2, 0]).item() / 3)


def test_every_step_is_orthogonal_to_every_kept_direction(text_model, tmp_path, monkeypatch, capsys):
    seen = []

    def recording(grads, params, basis):
        project_out(grads, params, basis)
        g = torch.cat([t.reshape(-1) for t in grads])
        seen.append((len(basis), float((basis @ g).abs().max()), float(g.norm())))

    monkeypatch.setattr(ogd_module, "project_out", recording)
    strategy = make_strategy("ogd", LORA, samples=6)
    res = run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / "r")
    sizes = [n for n, *_ in seen]
    assert sizes[:CONFIG.max_steps] == [sizes[0]] * CONFIG.max_steps and 1 <= sizes[0] <= 6  # a's directions
    assert sizes[CONFIG.max_steps:] == [sizes[-1]] * CONFIG.max_steps and sizes[0] < sizes[-1] <= 12  # a's and b's
    assert all(along <= 1e-5 * max(norm, 1e-12) + 1e-9 for _, along, norm in seen)
    basis = strategy.basis  # a's and b's: after the stream's last task no later step would use c's
    assert len(basis) == sizes[-1] and torch.allclose(basis @ basis.T, torch.eye(len(basis)), atol=1e-5)
    assert not np.isnan(res.matrix.R[-1]).any()
    mb = basis.numel() * 4 / 1e6
    out = capsys.readouterr().out
    assert f"task b (ogd): {len(basis) - sizes[0]} new directions kept, {len(basis)} in all ({mb:.1f} MB)" in out
    assert "task c (ogd)" not in out


def test_bad_options_are_refused():
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="ogd: samples must be an integer >= 1"):
            make_strategy("ogd", LORA, samples=bad)
