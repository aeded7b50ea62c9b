"""lamol (LAMOL on a shared delta): the step's extra loss against the paper's terms computed by
hand, the written samples' parsing, pseudo-examples written and trained on a tiny decoder, its
end (no language-model term and no pseudo-examples: seq-delta), kill + resume, and its refusals."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import adapters
from conftest import FAST, WORDS, assert_same_matrices, killed_and_resumed, tiny_lm_backbone, tiny_t5, toy_generative_stream, toy_stream
from continual import TrainConfig, make_strategy, run_stream
from continual.strategies import SHARED
from continual.strategies.lamol import ANSWER, generation_token, padded, split_sample
from streams import TaskStream

CONFIG = TrainConfig(**{**FAST, "max_steps": 40, "eval_every": 20, "max_length": 24, "lr": 3e-2})
LORA = [{"method": "lora", "rank": 4}]
# the tiny model writes well-formed examples only with LoRA on more of its maps (query and value alone
# learn the answer, not the prompt's words)
LORA_WIDE = [{"method": "lora", "rank": 8, "targets": ["query", "value", "attn_out", "ffn_up", "ffn_out"]}]


@pytest.fixture(scope="module")
def marked_tokenizer():
    """The toy tasks' word tokenizer with LAMOL's markers as words of their own (SmolLM2's cuts
    each into a few tokens; one token each keeps the tiny model's sequences short)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *WORDS, "Words", ":", "Is", "the", "keyword", "there", "?", "Answer", "yes", "no",
             ANSWER.strip(), *(generation_token(n) for n in "abc")]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture
def lm(marked_tokenizer):
    tok = marked_tokenizer
    return lambda: adapters.DeltaModel(tiny_lm_backbone(len(tok), tok.eos_token_id, tok.pad_token_id), tok, "tiny-llama")


def two_tasks():
    return TaskStream("toy-gen", toy_generative_stream().tasks[:2])


def test_a_written_sample_is_split_at_its_one_marker():
    assert split_sample([5, 6, 9, 7, 8], [9], ended=True) == ([5, 6], [7, 8])
    assert split_sample([5, 9, 9, 7], [9, 9], ended=True) == ([5], [7])
    for ids, ended in (([5, 6, 9, 7, 8], False),  # it ran out of room: no end of sequence
                       ([5, 6, 7], True),  # no marker
                       ([5, 9, 6, 9, 7], True),  # two
                       ([9, 7], True), ([5, 9], True)):  # no prompt; no answer
        assert split_sample(ids, [9], ended) is None


def test_padded_sequences_learn_from_their_first_learned_token_on():
    ids, mask, labels = padded([([1, 2, 3, 4], 2), ([5, 6, 7], 1)], pad=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # position i learns token i + 1: row 0 from its token 2 on, row 1 from its token 1 on
    assert labels.tolist() == [[-100, 3, 4, -100], [6, 7, -100, -100]]


def test_the_extra_loss_is_the_language_model_term_and_the_weighted_pseudo_examples(lm, marked_tokenizer):
    """λ times the batch's language-model loss (``GEN prompt ANS answer EOS``, every token after
    GEN learned) plus γ times a pseudo-example's question loss and λ times its language-model
    loss, each a mean over its tokens, computed here from the model's plain logits."""
    tok, model = marked_tokenizer, lm()
    strategy = make_strategy("lamol", LORA, lm_lambda=0.3, gamma=0.5, pseudo_batch=2)
    stream = two_tasks()
    for t in stream:
        strategy.prepare(model, t)
    with torch.no_grad():
        for p in model.task(SHARED).deltas.parameters():
            p.add_(0.2 * torch.randn_like(p))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, ans = tok.eos_token_id, enc(ANSWER)
    prompts, answers = [enc("Words : apple green Is the keyword there ? Answer :"), enc("Words : stone Answer :")], [enc("yes"), enc("no")]
    pseudo = ("a", enc("Words : river Answer :"), enc("no") + [eos])
    strategy.pseudo = [pseudo]
    term = strategy.loss_term(model, stream[1], CONFIG, None)
    width = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
    ids = torch.zeros((2, width), dtype=torch.long)
    mask, answer = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        row = p + a + [eos]
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        answer[r, len(p) - 1:len(row) - 1] = True
    model.activate(*strategy.active("b"))
    got = term({"input_ids": ids, "attention_mask": mask, "logit_positions": answer}, None, None)

    def mean_loss(seqs):  # each (ids, first learned token), run one at a time
        losses = []
        for s, first in seqs:
            logits = model(input_ids=torch.tensor([s]))[0]
            losses += [torch.nn.functional.cross_entropy(logits[i - 1].float(), torch.tensor(s[i]), reduction="none")
                       for i in range(first, len(s))]
        return torch.stack(losses).mean()

    gen_b, gen_a = enc(generation_token("b")), enc(generation_token("a"))
    assert len(gen_b) == len(gen_a) == len(ans) == 1
    batch_lm = mean_loss([(gen_b + p + ans + a + [eos], 1) for p, a in zip(prompts, answers)])
    _, pp, pa = pseudo
    expect = 0.3 * batch_lm + 0.5 * (mean_loss([(pp + pa, len(pp))]) + 0.3 * mean_loss([(gen_a + pp + ans + pa, 1)]))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task(SHARED).deltas.parameters())
    strategy.pseudo, strategy.lm_lambda = [], 0.0
    assert strategy.loss_term(model, stream[1], CONFIG, None)({"input_ids": ids, "attention_mask": mask,
                                                               "logit_positions": answer}, None, None) is None


def test_pseudo_examples_of_earlier_tasks_are_written_and_trained_on(lm, tmp_path, monkeypatch):
    """After task a, the model writes task a's examples from its generation token: before b and c
    a γ share of their training data is sampled, the well-formed ones kept and trained on, and
    each step's report lists them as text."""
    import continual.strategies.lamol as lamol

    seen = []
    real = lamol.LAMOL.loss_term
    monkeypatch.setattr(lamol.LAMOL, "loss_term", lambda self, *a: (seen.append(list(self.pseudo)), real(self, *a))[1])
    config = dataclasses.replace(CONFIG, max_steps=120, eval_every=120)
    res = run_stream(toy_generative_stream(), lm(), make_strategy("lamol", LORA_WIDE, gamma=0.5), config, tmp_path / "r")
    assert not np.isnan(res.matrix.R[-1]).any()
    assert seen[0] == [] and seen[1] and seen[2]
    assert {name for name, _, _ in seen[1]} == {"a"} and {name for name, _, _ in seen[2]} == {"a", "b"}
    for name, prompt, answer in seen[1] + seen[2]:
        assert prompt and answer[-1] == 2 and len(prompt) + len(answer) <= config.max_length
    rows = [json.loads(line) for line in (tmp_path / "r" / "reports" / "c" / "pseudo-examples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == [name for name, _, _ in seen[2]]
    # most are the toy tasks' own form, written by the model itself (sampled: some are not)
    formed = [r for r in rows if r["prompt"].startswith("Words :") and r["prompt"].endswith("Answer :")
              and r["answer"] in ("yes", "no")]
    assert len(formed) >= len(rows) / 2
    assert not (tmp_path / "r" / "reports" / "a").exists()  # nothing was written before the first task


def test_without_the_language_model_term_or_pseudo_examples_it_is_seq_delta(lm, tmp_path):
    stream = two_tasks()
    a = run_stream(stream, lm(), make_strategy("lamol", LORA, lm_lambda=0.0, gamma=0.0), CONFIG, tmp_path / "l")
    b = run_stream(stream, lm(), make_strategy("seq-delta", LORA), CONFIG, tmp_path / "s")
    assert_same_matrices(a, b)


def test_a_killed_run_resumes_to_the_same_matrices(lm, tmp_path):
    go = lambda d, **kw: run_stream(toy_generative_stream(), lm(), make_strategy("lamol", LORA_WIDE, gamma=0.5), CONFIG,  # noqa: E731
                                    tmp_path / d, **kw)
    assert_same_matrices(*killed_and_resumed(go))


def test_classification_tasks_t5_bad_options_and_lengths_past_the_positions_are_refused(lm, text_model, marked_tokenizer,
                                                                                          tmp_path):
    with pytest.raises(ValueError, match="strategy 'lamol' trains generative tasks only.*classification tasks"):
        run_stream(toy_stream(), text_model(), make_strategy("lamol", LORA), CONFIG, tmp_path / "c")
    with pytest.raises(ValueError, match="is an encoder-decoder"):
        run_stream(two_tasks(), tiny_t5(marked_tokenizer), make_strategy("lamol", LORA), CONFIG, tmp_path / "t")
    with pytest.raises(ValueError, match="language-model samples reach position 66, past the 64"):
        run_stream(two_tasks(), lm(), make_strategy("lamol", LORA), dataclasses.replace(CONFIG, max_length=64), tmp_path / "p")
    assert not (tmp_path / "c").exists() and not (tmp_path / "p").exists()
    for key, bad in (("lm_lambda", -1), ("lm_lambda", float("nan")), ("gamma", -0.1), ("gamma", True), ("top_k", 0),
                     ("top_k", 2.0), ("pseudo_batch", 0)):
        with pytest.raises(ValueError, match=f"lamol: {key} must be"):
            make_strategy("lamol", LORA, **{key: bad})
    s = make_strategy("lamol")
    assert [m.method for m in s.methods] == ["lora"] and not s.data_parallel
    assert s.describe()["gamma"] == 0.2 and s.describe()["lm_lambda"] == 0.25 and s.describe()["top_k"] == 20
