"""gem (GEM on a shared delta): the dual's solution against a brute-force projection, A-GEM's
projection as its one-task case, and in a real stream every step's gradient left with no
first-order rise of any earlier task's memory loss, on a tiny BERT."""

import itertools

import numpy as np
import pytest
import torch

from conftest import FAST, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import agem as agem_module
from continual.strategies import gem as gem_module
from continual.strategies.gem import project, solve_dual

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15})
LORA = [{"method": "lora", "rank": 4}]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]).double()


def nearest_feasible(g, G):
    """The z nearest to g with G z >= 0, by trying every set of active constraints (small k)."""
    best = None
    for k in range(len(G) + 1):
        for active in itertools.combinations(range(len(G)), k):
            z = g.clone()
            if active:
                A = G[list(active)]
                z = g - A.T @ torch.linalg.lstsq(A @ A.T, A @ g).solution
            if bool((G @ z >= -1e-9).all()) and (best is None or (z - g).norm() < (best - g).norm()):
                best = z
    return best


@pytest.mark.parametrize("seed", range(5))
def test_the_projection_is_the_nearest_gradient_that_raises_no_task_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)]
    g = flat(grads)
    refs = [[torch.randn(4, 3, generator=gen, dtype=torch.float64) - 0.5 * grads[0], None] for _ in range(3)]
    refs[0][1] = -grads[1]  # at least one task conflicts
    G = torch.stack([flat([r[0], r[1] if r[1] is not None else torch.zeros(6)]) for r in refs])
    assert bool((G @ g < 0).any())
    assert project(grads, refs, 0.0)
    z = flat(grads)
    assert bool((G @ z >= -1e-9 * z.norm() * G.norm()).all())  # no task's memory loss rises to first order
    assert torch.allclose(z, nearest_feasible(g, G), atol=1e-8)  # and no nearer gradient does that


def test_one_earlier_task_without_margin_is_agems_projection():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 2, generator=gen), torch.randn(3, generator=gen)]
    ref = [-grads[0] + 0.2 * torch.randn(5, 2, generator=gen), torch.randn(3, generator=gen)]
    ours, theirs = [t.clone() for t in grads], [t.clone() for t in grads]
    assert project(ours, [ref], 0.0) and agem_module.project(theirs, ref)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs))


def test_margin_no_conflict_zero_and_overflowed_references():
    g = torch.tensor([1.0, 0.0])
    conflicting = [[torch.tensor([-1.0, 4.0])]]  # <g, ref> = -1: the exact dual is v = 1/17
    plain, biased = [g.clone()], [g.clone()]
    assert project(plain, conflicting, 0.0) and project(biased, conflicting, 0.5)
    ref = conflicting[0][0]
    assert abs(float(plain[0] @ ref)) < 1e-6  # on the constraint's edge without a margin
    # v raised to the margin 0.5 pushes it inside, toward less loss on the task: <z, ref> = -1 + 0.5 * 17
    assert abs(float(biased[0] @ ref) - 7.5) < 1e-5
    same = [g.clone()]
    assert not project(same, [[torch.tensor([1.0, 1.0])]], 0.5) and torch.equal(same[0], g)  # no conflict: unchanged
    assert not project(same, [[None], [torch.zeros(2)]], 0.5) and torch.equal(same[0], g)
    # a task whose memory gradient overflowed (fp16) is no constraint; the others still are
    # the memory losses are scaled against fp16 underflow: the margin acts on the true gradients
    rescaled = [g.clone()]
    assert project(rescaled, [[ref * 4096]], 0.5, ref_scale=4096) and torch.allclose(rescaled[0], biased[0])
    mixed = [g.clone()]
    assert project(mixed, [[torch.tensor([float("inf"), 0.0])], conflicting[0]], 0.0)
    assert torch.allclose(mixed[0], plain[0])
    # the dual: exact on a problem solved by hand, and the floor respected
    v = solve_dual(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([-4.0, 3.0]), 0.0)
    assert torch.allclose(v, torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert torch.allclose(solve_dual(torch.eye(2), torch.tensor([-0.1, 3.0]), 0.5), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_every_step_ends_with_no_first_order_rise_of_any_task_memory_loss(text_model, tmp_path, monkeypatch, capsys):
    seen = []

    def recording(grads, refs, strength, ref_scale):
        G = torch.stack([flat([t if t is not None else torch.zeros_like(g) for t, g in zip(r, grads)]) for r in refs])
        before = G @ flat(grads)
        done = project(grads, refs, strength, ref_scale)
        seen.append((len(refs), before, G @ flat(grads), float(G.norm(dim=1).max() * flat(grads).norm()), done))
        return done

    monkeypatch.setattr(gem_module, "project", recording)
    strategy = make_strategy("gem", LORA, memory_size=30)  # the default margin: KKT keeps G z >= 0 with it too
    res = run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / "r")
    assert [s[0] for s in seen] == [1] * CONFIG.max_steps + [2] * CONFIG.max_steps  # b has a's memory; c has a's and b's
    projected = [s for s in seen if s[4]]
    assert projected and len(projected) < len(seen)
    assert all(bool((b < 0).any()) for _, b, *_ in projected) and all(bool((b >= 0).all()) for _, b, _, _, d in seen if not d)
    assert all(bool((after >= -1e-6 * scale).all()) for _, _, after, scale, _ in seen)
    out = capsys.readouterr().out
    assert f"task c (gem): {sum(s[4] for s in seen[30:])} of 30 steps' gradients conflicted with an earlier task's memory" in out
    assert not np.isnan(res.matrix.R[-1]).any()
    agem = make_strategy("agem", LORA, memory_size=30)  # the same memory as replay's and A-GEM's
    run_stream(toy_stream(), text_model(), agem, CONFIG, tmp_path / "agem")
    assert all(torch.equal(strategy.memory[n], agem.memory[n]) for n in "abc")
    assert strategy.loss_term(None, toy_stream()[1], CONFIG, None) is None


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1", True])
def test_a_bad_margin_is_refused(bad):  # (its memory's options: with A-GEM's, tests/test_agem.py)
    with pytest.raises(ValueError, match="gem: memory_strength must be a finite number >= 0"):
        make_strategy("gem", LORA, memory_strength=bad)
