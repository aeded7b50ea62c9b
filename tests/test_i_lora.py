"""i-lora (I-LoRA on a shared delta): the slow delta as the interpolation of the fast one's path,
the consistency term against states computed by hand, its ends (no interpolation and no
consistency is replay), and its refusals, on tiny models."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import FAST, tiny_t5, toy_generative_stream, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.scoring import TokenisedTasks
from continual.strategies import SHARED, base
from continual.strategies.i_lora import SLOW, ILoRA, state_distance
from continual.training import collate_rows
from continual.training import step as step_module
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 12, "eval_every": 4})
LORA = [{"method": "lora", "rank": 4}]


def values(model, name):
    return [p.detach().clone() for p in model.task(name).deltas.parameters()]


def test_state_distance_weighs_the_real_tokens_alone():
    fast, slow = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    slow[0, 0] = 2.0  # a real token, 4 entries off by 2
    slow[1, 2] = 5.0  # a padding position
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert state_distance(fast, slow, mask).item() == pytest.approx(4 * 4 / (4 * 4))
    assert state_distance(fast, slow, None).item() == pytest.approx((4 * 4 + 4 * 25) / 24)
    # a mask that does not line up with the states (a prompt's added positions): every position
    assert state_distance(fast, slow, torch.ones(2, 2)).item() == pytest.approx((4 * 4 + 4 * 25) / 24)


def test_one_sided_distance_counts_only_entries_where_fast_is_below_slow():
    fast = torch.tensor([[[1.0, 5.0], [0.0, 0.0]]])  # (1, 2, 2); the second position is padding
    slow = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    # target max(fast, slow) = [3, 5]: only the first entry is off, by 2
    assert state_distance(fast, slow, mask, one_sided=True).item() == pytest.approx(4 / 2)
    assert state_distance(fast, slow, mask).item() == pytest.approx((4 + 1) / 2)
    fast.requires_grad_(True)
    state_distance(fast, slow, mask, one_sided=True).backward()
    assert fast.grad[0, 0].tolist() == [pytest.approx(-2.0), 0.0]  # d/dfast of (3 - fast)^2 / 2 at fast = 1


def test_the_slow_delta_is_the_interpolation_of_the_fast_ones_path(text_model, tmp_path, monkeypatch):
    """Recorded apart from the strategy's code: the fast delta after every optimizer step, and as
    each task's training leaves it (its best-on-dev values); the slow delta must be
    θ_l ← λ_k θ_l + (1 − λ_k) θ_w over that path, λ_k = min(1 − 1/(k + 1), λ), from the fast
    delta's start, with each task's last step replaced by its final values."""
    model, lam = text_model(), 0.8
    start, after_step, ends = [], [], []
    real_step, real_train = step_module.TrainStep.__call__, base.train_task

    def stepping(self, *a, **kw):
        out = real_step(self, *a, **kw)
        after_step[-1].append(values(model, SHARED))
        return out

    def training(m, task, *a, **kw):
        if not start:
            start.append(values(model, SHARED))
        after_step.append([])
        result = real_train(m, task, *a, **kw)
        ends.append(values(model, SHARED))
        return result

    monkeypatch.setattr(step_module.TrainStep, "__call__", stepping)
    monkeypatch.setattr(base, "train_task", training)
    strategy = make_strategy("i-lora", LORA, memory_size=30, interpolation=lam)
    res = run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any() and len(after_step) == 3
    path = [v for steps, end in zip(after_step, ends) for v in steps[:-1] + [end]]
    assert strategy.steps == len(path) == sum(len(s) for s in after_step)
    want = start[0]
    for k, fast in enumerate(path, 1):
        w = min(1 - 1 / (k + 1), lam)
        want = [w * s + (1 - w) * f for s, f in zip(want, fast)]
    slow = values(model, SLOW)
    for got, expected in zip(slow, want):
        torch.testing.assert_close(got, expected)
    assert any(not torch.allclose(s, f) for s, f in zip(slow, ends[-1]))  # it lags the fast delta
    # what answers, and what the run saves, is the slow delta
    assert strategy.active("c") == (SLOW, "c") and strategy.trains_with("c") == (SHARED, "c")
    assert (tmp_path / "r" / "checkpoints" / "c" / SLOW).is_dir()


def hand_states(model, batch, generative):
    """The token states a head reads, computed without the strategy's hook: T5's decoder's last
    layer (after its final norm) for a generative task, else :meth:`DeltaModel.encode`'s, with the
    mask that weighs them (None: every position)."""
    if model.seq2seq and generative:
        out = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             decoder_input_ids=batch["decoder_input_ids"], output_hidden_states=True)
        return out.decoder_hidden_states[-1], None
    return model.encode(batch["input_ids"], batch["attention_mask"])


def slow_apart_terms(model, strategy, old, config):
    """After a run: the slow delta moved away from the fast one, then (the memory term, replay's
    loss, both on all of ``old``'s memory, the memory's tokenised rows)."""
    with torch.no_grad():
        for p in model.task(SLOW).deltas.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = TokenisedTasks(model.tokenizer, config.max_length, 32, decoder_start=model.decoder_start_id)
    picks = [(old, int(i)) for i in strategy.memory[old.name]]
    model.eval()
    with torch.no_grad():
        term = strategy.memory_term(model, data, picks).item()
        replay = strategy.memory_loss(model, data, picks).item()
    return term, replay, collate_rows(data(old)["train"], [i for _, i in picks], model.tokenizer)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "t5"])
def test_the_memory_term_is_replays_loss_plus_gamma_times_the_state_distance(kind, text_model, lm_model, word_tokenizer,
                                                                             tmp_path):
    generative = kind != "encoder"
    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2]) if generative else toy_stream()
    model = {"encoder": text_model, "decoder": lm_model, "t5": lambda: tiny_t5(word_tokenizer)}[kind]()
    config = dataclasses.replace(CONFIG, max_length=32, lr=3e-2) if generative else CONFIG
    strategy = make_strategy("i-lora", LORA, memory_size=20, consistency=2.5)
    run_stream(stream, model, strategy, config, tmp_path / "r")
    term, replay, rows = slow_apart_terms(model, strategy, stream[0], config)
    old = stream[0]
    with torch.no_grad():
        batch = {k: v.to(model.device) for k, v in rows.items()}
        states = {}
        for name in (SHARED, SLOW):
            with model.acting(name, old.name):
                states[name], mask = hand_states(model, batch, generative)
        m = torch.ones(states[SLOW].shape[:2]) if mask is None else mask.float()
        m = m.unsqueeze(-1)
        by_hand = (((states[SHARED] - states[SLOW]) ** 2) * m).sum() / (m.sum() * states[SLOW].shape[-1])
    assert by_hand.item() > 1e-8
    assert term == pytest.approx(replay + 2.5 * by_hand.item(), rel=1e-5)


def test_no_interpolation_and_no_consistency_is_replay(text_model, tmp_path):
    go = lambda name, d, **kw: run_stream(toy_stream(), text_model(), make_strategy(name, LORA, memory_size=30, **kw),  # noqa: E731
                                          CONFIG, tmp_path / d).matrix
    ends = go("i-lora", "ends", interpolation=0.0, consistency=0.0)
    np.testing.assert_array_equal(ends.R, go("replay", "replay").R)
    both = go("i-lora", "both")
    assert not np.array_equal(both.R, ends.R) and not np.isnan(both.R[-1]).any()


def test_bad_options_are_refused():
    for bad in (1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"i-lora: interpolation must be a number in \[0, 1\)"):
            make_strategy("i-lora", LORA, interpolation=bad)
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="i-lora: consistency must be a finite number >= 0"):
            make_strategy("i-lora", LORA, consistency=bad)
    with pytest.raises(ValueError, match="i-lora: features must be one of last, all-max, got 'all'"):
        make_strategy("i-lora", LORA, features="all")
    described = make_strategy("i-lora", LORA).describe()
    assert (described["interpolation"], described["consistency"], described["memory_size"]) == (0.25, 1.0, 200)
    assert described["features"] == "last"
    with pytest.raises(ValueError, match=f"task name {SLOW!r} is reserved by the i-lora strategy"):
        ILoRA(LORA).check_name(SLOW)


def test_all_max_features_weigh_every_blocks_states_one_sided(text_model, tmp_path):
    """``features="all-max"``: replay's loss plus γ times the mean over the encoder's blocks of the
    one-sided distance of their outputs, computed by hand from the backbone's hidden states (entry
    0, the embeddings' output, left out)."""
    model = text_model()
    strategy = make_strategy("i-lora", LORA, memory_size=20, consistency=2.5, features="all-max")
    run_stream(toy_stream(), model, strategy, CONFIG, tmp_path / "r")
    term, replay, rows = slow_apart_terms(model, strategy, toy_stream()[0], CONFIG)
    old = toy_stream()[0]
    with torch.no_grad():
        states = {}
        for name in (SHARED, SLOW):
            with model.acting(name, old.name):
                states[name] = model.backbone(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                              output_hidden_states=True).hidden_states[1:]
        m = rows["attention_mask"].float().unsqueeze(-1)
        per_block = [(((s - f).clamp_min(0) ** 2) * m).sum() / (m.sum() * f.shape[-1])
                     for f, s in zip(states[SHARED], states[SLOW])]
        by_hand = torch.stack(per_block).mean().item()
        plain = sum((((s - f) ** 2) * m).sum() / (m.sum() * f.shape[-1]) for f, s in zip(states[SHARED], states[SLOW]))
    assert len(per_block) > 1 and by_hand > 1e-8 and by_hand < plain.item() / len(per_block)
    assert term == pytest.approx(replay + 2.5 * by_hand, rel=1e-5)


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_all_max_features_on_generative_backbones(kind, lm_model, word_tokenizer, tmp_path):
    """On a decoder and on T5 (encoder and decoder blocks) the all-block term trains a stream and is
    zero when the two copies agree, positive when they do not."""
    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2])
    model = lm_model() if kind == "decoder" else tiny_t5(word_tokenizer)
    config = dataclasses.replace(CONFIG, max_length=32, lr=3e-2)
    strategy = make_strategy("i-lora", LORA, memory_size=20, features="all-max")
    res = run_stream(stream, model, strategy, config, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    data = TokenisedTasks(model.tokenizer, config.max_length, 32, decoder_start=model.decoder_start_id)
    picks = [(stream[0], int(i)) for i in strategy.memory[stream[0].name]]
    model.eval()
    with torch.no_grad():
        model.task(SLOW).deltas.load_state_dict(model.task(SHARED).deltas.state_dict())
        replay = strategy.memory_loss(model, data, picks).item()
        assert strategy.memory_term(model, data, picks).item() == pytest.approx(replay, rel=1e-6)
        for p in model.task(SLOW).deltas.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert strategy.memory_term(model, data, picks).item() > replay + 1e-8
