"""agem (A-GEM on a shared delta): the projection itself, and in a real stream every step's
gradient left with no first-order rise of the memory loss, on a tiny BERT."""

import numpy as np
import pytest
import torch

from conftest import FAST
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import agem as agem_module
from continual.strategies.agem import project
from conftest import toy_stream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15})
LORA = [{"method": "lora", "rank": 4}]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_projection_removes_only_the_conflicting_component():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, generator=g)]
    refs = [-grads[0] + 0.1 * torch.randn(3, 4, generator=g), torch.randn(5, generator=g), None]  # None: no reference there
    before = [x.clone() for x in grads]
    ref = flat([refs[0], refs[1]])
    assert float(flat(before[:2]) @ ref) < 0
    assert project(grads, refs)
    after = flat(grads[:2])
    assert abs(float(after @ ref)) < 1e-5 * float(after.norm() * ref.norm())  # no longer against the memory
    change = after - flat(before[:2])  # the smallest change that does it: along the reference only
    assert torch.allclose(change, (float(change @ ref) / float(ref @ ref)) * ref, atol=1e-6)
    assert torch.equal(grads[2], before[2])  # a tensor without a reference is untouched
    agreeing = [x.clone() for x in before]
    assert not project(agreeing, [-refs[0], -refs[1], None])  # no conflict: unchanged
    assert all(torch.equal(a, b) for a, b in zip(agreeing, before))
    assert not project([x.clone() for x in before], [torch.zeros(3, 4), None, None])  # a zero reference
    # the reference's scale cancels (the memory loss is scaled by REF_SCALE against fp16 underflow)
    scaled = [x.clone() for x in before]
    assert project(scaled, [r * agem_module.REF_SCALE if r is not None else None for r in refs])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(scaled, grads))
    overflowed = [x.clone() for x in before]  # an fp16 overflow in the memory's gradients: no projection
    assert not project(overflowed, [torch.full((3, 4), float("inf")), None, None])
    assert all(torch.equal(a, b) for a, b in zip(overflowed, before))


def test_every_step_ends_with_no_first_order_rise_of_the_memory_loss(text_model, tmp_path, monkeypatch, capsys):
    seen = []

    def recording(grads, refs):
        pairs = [(g, r) for g, r in zip(grads, refs) if r is not None]
        dot = lambda: float(sum((g.double() * r.double()).sum() for g, r in pairs))  # noqa: E731
        before = dot()
        done = project(grads, refs)
        norms = float(flat([g for g, _ in pairs]).norm() * flat([r for _, r in pairs]).norm())
        seen.append((before, dot(), norms, done))
        return done

    monkeypatch.setattr(agem_module, "project", recording)
    strategy = make_strategy("agem", LORA, memory_size=30)
    res = run_stream(toy_stream(), text_model(), strategy, CONFIG, tmp_path / "r")
    assert len(seen) == 2 * CONFIG.max_steps  # tasks b and c: every step has a memory (a's has none)
    projected = [s for s in seen if s[3]]
    assert projected and len(projected) < len(seen)  # the toy tasks conflict on some steps, not all
    assert all(b < 0 for b, *_ in projected) and all(b >= 0 for b, _, _, d in seen if not d)
    assert all(a >= -1e-6 * n for _, a, n, _ in seen)
    out = capsys.readouterr().out
    assert f"task b (agem): {sum(d for *_, d in seen[:30])} of 30 steps' gradients conflicted" in out
    assert not np.isnan(res.matrix.R[-1]).any()
    # its memory is replay's (seeded, task-balanced), and only vetoes: no replay loss is added
    replay = make_strategy("replay", LORA, memory_size=30)
    run_stream(toy_stream(), text_model(), replay, CONFIG, tmp_path / "replay")
    assert all(torch.equal(strategy.memory[n], replay.memory[n]) for n in "abc")
    assert strategy.loss_term(None, toy_stream()[1], CONFIG, None) is None


@pytest.mark.parametrize("name", ["agem", "gem"])
def test_bad_options_are_refused(name):
    with pytest.raises(ValueError, match=f"{name}: sample_size must be an integer >= 1, got 0"):
        make_strategy(name, LORA, sample_size=0)
    with pytest.raises(ValueError, match=f"{name}: memory_size must be an integer >= 1"):
        make_strategy(name, LORA, memory_size=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['replay_batch'\]"):
        make_strategy(name, LORA, replay_batch=4)
