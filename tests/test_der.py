"""der (DER++ on a shared delta): the logit-matching term, the logits recorded as each task ends,
and the two ends of its family (alpha = beta = 0 is seq-delta, alpha = 0 is replay), on tiny models."""

import numpy as np
import pytest
import torch

from conftest import FAST, toy_generative_stream, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.scoring import TokenisedTasks
from continual.strategies import der as der_module
from continual.strategies.der import kept, logit_match, logit_rows, rows_per_example
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 15})
GEN = TrainConfig(**{**FAST, "max_steps": 30, "lr": 3e-2, "max_length": 32, "eval_every": 15})
LORA = [{"method": "lora", "rank": 4}]


def test_kept_rows_and_the_match_term():
    g = torch.Generator().manual_seed(0)
    narrow = torch.randn(5, 3, generator=g)
    i, v = kept(narrow, k=4)  # a classifier's row: kept whole
    assert torch.equal(i, torch.arange(3).expand(5, -1)) and torch.equal(v, narrow)
    wide = torch.randn(6, 50, generator=g)
    i, v = kept(wide, k=4)  # a vocabulary row: its 4 largest
    assert torch.equal(v, wide.topk(4, dim=-1).values) and torch.equal(wide.gather(-1, i), v)
    assert logit_match(wide, i, v).item() == 0.0
    moved = wide.clone()
    moved[0, i[0, 0]] += 2.0  # a kept entry moves: (2^2) / (6 * 4)
    assert logit_match(moved, i, v).item() == pytest.approx(4.0 / 24)
    other = wide.clone()
    other[0, [j for j in range(50) if j not in i[0].tolist()][0]] += 5.0  # an entry not kept: not matched
    assert logit_match(other, i, v).item() == 0.0
    # a language model's rows: its labelled positions, example by example
    logits, labels = torch.randn(2, 4, 7), torch.tensor([[-100, 3, 4, -100], [-100, -100, -100, 1]])
    assert torch.equal(logit_rows(logits, labels), torch.stack([logits[0, 1], logits[0, 2], logits[1, 3]]))
    assert rows_per_example(logits, labels).tolist() == [2, 1]
    assert rows_per_example(torch.randn(3, 2), torch.tensor([0, 1, 1])).tolist() == [1, 1, 1]


def test_recorded_logits_are_the_delta_as_its_task_ended(text_model, tmp_path):
    """Right after the stream, the last task's term is zero (its logits were recorded by the delta
    as it is now); an earlier task's is not (the shared delta moved since). Resumed: the same."""
    model, stream = text_model(), toy_stream()
    der = make_strategy("der", LORA, memory_size=30, beta=0.0)
    run_stream(stream, model, der, CONFIG, tmp_path / "r")
    assert [len(der.memory[n]) for n in "abc"] == [10, 10, 10]
    assert all(len(der.recorded[n][0]) == 10 and len(der.recorded[n][1]) == 10 for n in "abc")  # cut with the memory
    data = TokenisedTasks(model.tokenizer, CONFIG.max_length, 32)
    model.eval()
    with torch.no_grad():
        terms = {t.name: der.memory_loss(model, data, [(t, int(i)) for i in der.memory[t.name]], der.dark_loss).item()
                 for t in stream}
    assert terms["c"] == pytest.approx(0.0, abs=1e-10)
    assert terms["a"] > 1e-6 and terms["b"] > 1e-6
    # the memory's first 10 of a's 30 recorded rows are the ones kept: recorded again now, they differ
    fresh = der.record(model, stream[0], data(stream[0])["train"], CONFIG)
    assert fresh[0].tolist() == der.recorded["a"][0].tolist() and not torch.allclose(fresh[2], der.recorded["a"][2])


def test_alpha_zero_is_replay_and_both_zero_is_seq_delta(text_model, tmp_path):
    go = lambda name, d, **kw: run_stream(toy_stream(), text_model(), make_strategy(name, LORA, **kw), CONFIG,  # noqa: E731
                                          tmp_path / d).matrix
    der_replay = go("der", "a0", memory_size=30, alpha=0.0, beta=1.0)
    np.testing.assert_array_equal(der_replay.R, go("replay", "replay", memory_size=30).R)
    np.testing.assert_array_equal(go("der", "00", memory_size=30, alpha=0.0, beta=0.0).R, go("seq-delta", "seq").R)
    dark = go("der", "dark", memory_size=30)
    assert not np.array_equal(dark.R, der_replay.R) and not np.isnan(dark.R[-1]).any()


def test_generative_tasks_keep_the_largest_answer_logits(lm_model, tmp_path, monkeypatch):
    monkeypatch.setattr(der_module, "TOPK", 8)  # below the toy vocabulary, so the top-k path runs
    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2])
    model = lm_model()
    der = make_strategy("der", LORA, memory_size=20)
    res = run_stream(stream, model, der, GEN, tmp_path / "g")
    counts, indices, values = der.recorded[stream[0].name]
    assert len(counts) == 10 and (counts >= 1).all() and len(indices) == int(counts.sum())
    assert indices.shape[1] == 8 and (values[:, :-1] >= values[:, 1:]).all()  # the 8 largest, in order
    assert not np.isnan(res.matrix.R[-1]).any()


def test_a_generative_memory_batch_runs_the_lm_head_at_its_answer_positions_alone(lm_model, tmp_path):
    """The memory loss of a generative task (replay's, A-GEM's, GEM's, DER's) asks the model for the
    answer positions' logits only, as a training step does, and equals the cross-entropy over the
    whole logits; DER's term for the task that just ended is still zero along that path."""
    from continual.training import collate_rows, token_loss

    stream = TaskStream("toy-gen", toy_generative_stream().tasks[:2])
    model = lm_model()
    der = make_strategy("der", LORA, memory_size=20, beta=0.0)
    run_stream(stream, model, der, GEN, tmp_path / "g")
    data = TokenisedTasks(model.tokenizer, GEN.max_length, 32)
    task = stream[1]
    picks = [(task, int(i)) for i in der.memory[task.name]]
    asked = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: (asked.append(kw.get("logit_positions")), real_forward(*a, **kw))[-1]
    model.eval()
    with torch.no_grad():
        ce = der.memory_loss(model, data, picks).item()
        dark = der.memory_loss(model, data, picks, der.dark_loss).item()
    del model.forward
    assert len(asked) == 2 and all(a is not None and 0 < int(a.sum()) < a.numel() for a in asked)
    batch = {k: v.to(model.device) for k, v in collate_rows(data(task)["train"], [i for _, i in picks], model.tokenizer).items()}
    labels = batch.pop("labels")
    with torch.no_grad(), model.acting(*der.active(task.name)):
        whole = token_loss(model(**batch), labels).item()
    assert ce == pytest.approx(whole, rel=1e-5) and dark == pytest.approx(0.0, abs=1e-8)


def test_bad_options_are_refused():
    for key, bad in (("alpha", -0.1), ("beta", float("nan")), ("alpha", float("inf")), ("beta", "1")):
        with pytest.raises(ValueError, match=f"der: {key} must be a finite number >= 0"):
            make_strategy("der", LORA, **{key: bad})
    with pytest.raises(ValueError, match="der: memory_size must be an integer >= 1"):
        make_strategy("der", LORA, memory_size=0)


def test_a_memory_smaller_than_the_stream_leaves_the_last_task_none(text_model, tmp_path):
    from safetensors.torch import load_file

    der = make_strategy("der", LORA, memory_size=2)
    res = run_stream(toy_stream(), text_model(), der, TrainConfig(**{**FAST, "max_steps": 10, "eval_every": 5}), tmp_path / "r")
    assert [len(der.recorded[n][0]) for n in "abc"] == [1, 1, 0] and not np.isnan(res.matrix.R[-1]).any()
    saved = load_file(str(sorted((tmp_path / "r").glob("state-step*.safetensors"))[-1]))
    assert saved["der.2.counts"].shape == (0,) and saved["der.0.values"].shape == (1, 2)
