"""Generative (text-to-text) tasks end to end: text scores, the tokenised layout, built-in and YAML
generative streams, and streams run by the scheduler on a tiny random-init Llama causal LM
(per-task deltas never forget, a shared delta does, resume retraces, wrong setups are refused)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from conftest import FAST, GEN_TEMPLATE, WORDS, toy_generative_stream, toy_task
from continual import TrainConfig, make_strategy, run_stream
from continual.training import eval_loader, evaluate, score_texts, tokenize
from continual.training.textscore import _lcs, edit_sim, exact_match, rouge_l, sari, score_each, token_f1
from streams import DataError, Verbalizer, load_stream, stream_from_yaml, verbalize

GEN = TrainConfig(**{**FAST, "max_steps": 100, "lr": 3e-2, "max_length": 32, "eval_every": 25})
LORA = [{"method": "lora", "rank": 4}]


def test_longest_common_subsequence_matches_the_table():
    """The bit-vector LCS (ROUGE-L's and edit similarity's) against the textbook table, on random
    sequences over small alphabets (many ties), either one the longer, and empty ones."""
    def table(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 70))]  # past one 64-bit word
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        assert _lcs(a, b) == _lcs(b, a) == table(a, b)
    assert _lcs("police arrest man".split(), "man police arrest".split()) == 2


def test_edit_similarity_is_trace_py150_score():
    """``2 LCS / (|p| + |r|)`` over characters (an insert/delete edit distance, fuzzywuzzy's ratio
    / 100): case and punctuation count, Py150's literal placeholders read as their literals."""
    assert edit_sim("return x", "return x") == 1.0 and edit_sim("", "x") == 0.0 and edit_sim(" ", " ") == 0.0
    assert edit_sim("def f(x):", "def f(y):") == pytest.approx(2 * 8 / 18)
    assert edit_sim("Return X", "return x") == pytest.approx(2 * 6 / 16)  # not lower-cased: code
    assert edit_sim("x = <NUM_LIT>", "x = 0") == 1.0 and edit_sim("f(<STR_LIT:'a'>)", "f('a')") == 1.0
    assert edit_sim(" x = 1", "x = 1") == 1.0  # the leading space of a tokenised answer
    scores = score_texts(["x = 1", "y"], ["x = 2", "z"], "edit_sim")
    assert scores["accuracy"] == scores["edit_sim"] == pytest.approx((2 * 4 / 10 + 0) / 2)


def test_sari_scores_what_an_answer_kept_deleted_and_added_of_its_prompt():
    """SARI (Xu et al. 2016) worked by hand: source "a b c", reference "a b d", the answer a copy
    of the source. Per n (1..4): keep F1 0.8, 2/3, 0, 1 (no 4-grams: nothing to keep is right);
    delete precision 1 (nothing deleted); add F1 0 for n = 1..3 (d not added), 1 for n = 4."""
    keep, delete, add = (0.8 + 2 / 3 + 0 + 1) / 4, 1.0, 1 / 4
    assert sari("a b c", "a b d", "a b c") == pytest.approx((keep + delete + add) / 3)
    assert sari("A b D.", "a b d .", "a b c") == 1.0  # the reference itself: lower-cased, "." a word
    assert sari("", "a b d", "a b c") == 0.0  # nothing generated scores nothing (SARI would credit deleting)
    # deleting right is credited: answering "a" drops b and c, and the reference drops c only
    assert 0 < sari("a", "a b d", "a b c") < sari("a b", "a b d", "a b c")
    with pytest.raises(ValueError, match="scores an answer against its prompt"):
        score_texts(["a b"], ["a b d"], "sari")
    scores = score_texts(["a b c", "a b d"], ["a b d"] * 2, "sari", ["a b c"] * 2)
    assert scores["accuracy"] == scores["sari"] == pytest.approx(((keep + delete + add) / 3 + 1) / 2)


def test_sari_is_scored_against_the_prompts_the_model_read(lm_model, word_tokenizer):
    """A SARI task's score needs each answer's prompt: the loader gives them back decoded from
    its tokens, in the split's order (answers are generated in order of length)."""
    from continual.training.evaluate import answers

    task = toy_generative_stream()[0]
    model = lm_model()
    model.add_task("a", "lora", generative=True)
    loader = eval_loader(tokenize(task.test, word_tokenizer, 32, "sari"), word_tokenizer, 32, 4)
    assert loader.metric == "sari"
    words = lambda texts: [re.findall(r"\w+|[^\w\s]", t) for t in texts]  # noqa: E731  (the word tokenizer's spacing differs)
    assert words(loader.sources()) == words(task.test["text"])
    each: list[float] = []
    scores = evaluate(model, "a", loader, per_example=each)
    preds, refs = answers(model, loader, ["a"])
    assert each == score_each("sari", preds, refs, list(task.test["text"]))
    assert scores["accuracy"] == pytest.approx(np.mean(each)) and scores["sari"] == scores["accuracy"]


def test_every_metric_a_stream_may_name_is_one_scoring_knows():
    """streams names the metrics and continual scores them (the bottom layer imports nothing of ours):
    a name in one list alone was accepted at load time and failed after training, or never offered."""
    import streams
    from continual.training import textscore

    assert streams.METRICS == textscore.METRICS


def test_text_scores():
    assert exact_match("Positive.", "positive") == 1.0 and exact_match("positive review", "positive") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    # LCS of "police arrest man" and "man police arrest" is "police arrest": P = R = 2/3
    assert rouge_l("police arrest man", "man police arrest") == pytest.approx(2 / 3)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 0.0 and token_f1("", "") == 0.0  # nothing generated
    # normalising must not erase the answer: with target "A", "", "." and "The" are all wrong
    assert score_texts(["", ".", "The", "B"], ["A"] * 4, "exact")["accuracy"] == 0.0
    assert score_texts(["A.", "a", "the"], ["A", "a", "The"], "exact")["accuracy"] == 1.0
    assert exact_match(".", ".") == 1.0 and exact_match("", ".") == 0.0 and exact_match("the cat", "cat") == 1.0
    # numbers keep their sign and point (SQuAD's rule scored "1" right for "-1" and "35" for "3.5")
    assert exact_match("1", "-1") == 0.0 and exact_match("35", "3.5") == 0.0 and exact_match("-1.", "-1") == 1.0
    assert exact_match("The answer is -3.", "answer is -3") == 1.0 and exact_match("1,000,000", "1000000") == 1.0
    assert exact_match("well-known", "well known") == 1.0 and token_f1("-2 apples", "2 apples") == 0.5
    s = score_texts(["yes", "no", "maybe", "yes"], ["yes", "no", "no", "no"], "exact")
    assert s["accuracy"] == 0.5 and s["exact"] == 0.5
    # label-word macro-F1: "yes" F1 = 2/3, "no" F1 = 2*2/(2*2+0+2)... tp=2, fp=0, fn=... computed by hand:
    # yes: tp1 fp1 fn0 -> 2/3; no: tp1 fp0 fn2 -> 2/4
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    with pytest.raises(ValueError, match="unknown metric"):
        score_texts(["a"], ["a"], "bleu")


def test_tokenised_layout(word_tokenizer):
    task = toy_generative_stream()[0]
    ds = tokenize(task.train, word_tokenizer, 32, task.metric)
    row = ds[0]
    ids, labels, p = row["input_ids"], row["lm_labels"], row["prompt_len"]
    assert ids[-1] == word_tokenizer.eos_token_id
    # shifted labels: position i predicts token i + 1, and only the target (answer + eos) is learned
    assert [x for x in labels if x != -100] == ids[p:]
    assert all(labels[i] == ids[i + 1] for i in range(p - 1, len(ids) - 1))
    assert word_tokenizer.decode(ids[p:-1]).strip() == row["target"]
    short = tokenize(task.train, word_tokenizer, 6, task.metric)[0]  # truncation cuts the prompt's start
    assert len(short["input_ids"]) == 6 and short["input_ids"][-2:] == ids[-2:]
    loader = eval_loader(task.test, word_tokenizer, 32, 8)
    batch = next(iter(loader))
    assert loader.metric == "exact" and loader.max_new_tokens == 2  # one answer word + eos
    assert (batch["attention_mask"][:, -1] == 1).all()  # prompts are left-padded
    assert batch["references"] == list(task.test["target"][:8])
    # an answer of 40 words is generated whole where training keeps it (max_length 128 keeps 63
    # tokens of an answer), and cut as training cuts it where it does not: a cap of 32 tokens
    # scored long answers (TRACE's summaries) on their first 31 tokens
    from datasets import Dataset

    long = Dataset.from_dict({"text": ["Words: apple"] * 2, "target": [" ".join(WORDS[:10] * 4), "yes"]})
    assert eval_loader(long, word_tokenizer, 128, 8).max_new_tokens == 41
    assert eval_loader(long, word_tokenizer, 64, 8).max_new_tokens == 32  # 31 answer tokens kept, + eos


def test_builtin_generative_stream():
    stream = load_stream("generative", max_train=12, max_eval=6)
    assert stream.names == ["movie", "trec", "sms", "headline"]
    movie, trec, headline = stream["movie"], stream["trec"], stream["headline"]
    assert all(t.generative for t in stream)
    assert movie.metric == "exact" and headline.metric == "rouge_l"
    assert set(movie.train["target"]) <= {"positive", "negative"} and movie.label_names == ["negative", "positive"]
    assert set(trec.train["target"]) <= {"description", "entity", "abbreviation", "human", "number", "location"}
    assert all(t.endswith("\nAnswer:") for t in movie.train["text"])
    assert all(t.endswith("\nHeadline:") for t in headline.train["text"]) and all(headline.train["target"])
    assert load_stream("generative", max_train=12, max_eval=6).fingerprints() == stream.fingerprints()


def test_yaml_generative_tasks(tmp_path):
    rows = "\n".join(f'{{"doc": "text number {i}", "answer": "label {i % 3}"}}' for i in range(40))
    (tmp_path / "pairs.jsonl").write_text(rows + "\n")
    (tmp_path / "s.yaml").write_text(
        "tasks:\n"
        "  - name: pairs\n    train: pairs.jsonl\n    text_column: doc\n    target_column: answer\n"
        "    template: \"{text}\\nLabel:\"\n    metric: token_f1\n"
        "  - name: sms-gen\n    source: sms\n    generative: true\n    answers: {ham: normal}\n    max_train: 10\n    max_eval: 5\n"
    )
    stream = stream_from_yaml(tmp_path / "s.yaml")
    pairs, sms = stream["pairs"], stream["sms-gen"]
    assert pairs.metric == "token_f1" and pairs.train[0]["text"].endswith("\nLabel:")
    assert sum(pairs.sizes().values()) == 40
    assert set(sms.train["target"]) <= {"normal", "spam"} and sms.metric == "exact"
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - name: p\n    train: pairs.jsonl\n    text_column: doc\n    target_column: answer\n    template: no-slot\n")
    with pytest.raises(DataError, match="must be a string holding"):
        stream_from_yaml(bad)
    bad.write_text("tasks:\n  - name: p\n    train: pairs.jsonl\n    text_column: doc\n    target_column: nope\n")
    with pytest.raises(DataError, match="no column 'nope'"):
        stream_from_yaml(bad)
    bad.write_text("tasks:\n  - name: p\n    train: pairs.jsonl\n    text_column: doc\n    target_column: answer\n    label_column: x\n")
    with pytest.raises(DataError, match="does not apply"):
        stream_from_yaml(bad)
    bad.write_text("tasks:\n  - name: p\n    train: gone.jsonl\n    target_column: answer\n    metric: bleu\n")
    with pytest.raises(DataError, match=r"bad\.yaml: task 'p'.*unknown metric 'bleu'; known: exact, token_f1, rouge_l"):
        stream_from_yaml(bad)  # named with its file before the (missing) data are read
    with pytest.raises(DataError, match="share an answer word"):
        verbalize(toy_task("t", "apple", 1), Verbalizer(GEN_TEMPLATE, {"no": "x", "yes": "x"}))


def test_per_task_deltas_never_forget_generative_tasks(lm_model, tmp_path):
    model = lm_model()
    res = run_stream(toy_generative_stream(), model, make_strategy("per-task", LORA), GEN, tmp_path / "r")
    R = res.matrix.R
    assert np.all(np.diag(R) >= 0.9), R  # the answers are generated right
    assert res.metrics["BWT"] == 0.0 and res.metrics["forgetting"] == 0.0
    np.testing.assert_array_equal(R[2, :2], np.diag(R)[:2])
    # the stored score is what generating again gives
    task = toy_generative_stream()[0]
    again = evaluate(model, task.name, eval_loader(task.test, model.tokenizer, GEN.max_length, 32))
    assert again["accuracy"] == R[2, 0]


def test_shared_delta_forgets_and_resume_retraces(lm_model, tmp_path):
    from test_runner import Recorder

    ref = run_stream(toy_generative_stream(), lm_model(), make_strategy("seq-delta", LORA), GEN, tmp_path / "ref")
    assert ref.metrics["forgetting"] > 0.1, ref.matrix.R
    with pytest.raises(KeyboardInterrupt):
        run_stream(toy_generative_stream(), lm_model(), make_strategy("seq-delta", LORA), GEN, tmp_path / "k",
                   loggers=[Recorder(kill_at_row=1)])
    resumed = run_stream(toy_generative_stream(), lm_model(), make_strategy("seq-delta", LORA), GEN, tmp_path / "k", resume=True)
    np.testing.assert_array_equal(resumed.matrix.R, ref.matrix.R)


def test_generative_streams_refuse_wrong_setups(lm_model, text_model, tmp_path):
    with pytest.raises(ValueError, match="no language-model head"):
        run_stream(toy_generative_stream(), text_model(), make_strategy("per-task", LORA), GEN, tmp_path / "a")
    with pytest.raises(ValueError, match="classification tasks only"):
        run_stream(toy_generative_stream(), lm_model(), make_strategy("avalanche-naive"), GEN, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_decoder_with_absolute_positions_has_room_to_generate_the_answers(word_tokenizer, tmp_path):
    """GPT-2 has a table of 64 positions here: at max_length 64, scoring ran prompt + generated
    answer past it, an IndexError (a device assert on a GPU) after the first task had trained."""
    import adapters
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    model = adapters.DeltaModel(gpt2, tok, "tiny-gpt2")
    lora = make_strategy("per-task", [{"method": "lora", "rank": 4, "targets": ["attn.c_attn"]}])
    with pytest.raises(ValueError, match="past the 64 of the backbone 'tiny-gpt2' .* at most 43"):
        run_stream(toy_generative_stream(), model, lora, TrainConfig(**{**FAST, "max_length": 64}), tmp_path / "a")
    prompt = make_strategy("per-task", [{"method": "prompt", "num_tokens": 10}])  # 10 positions more
    with pytest.raises(ValueError, match=r"reaches position 73 \(10 prepended, .* at most 37 or prepend fewer"):
        run_stream(toy_generative_stream(), model, prompt, TrainConfig(**{**FAST, "max_length": 43}), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    chain = make_strategy("progressive-prompts", [{"method": "prompt", "num_tokens": 4}])  # 3 tasks x 4 in front
    with pytest.raises(ValueError, match=r"reaches position 75 \(12 prepended, .* at most 35"):
        run_stream(toy_generative_stream(), model, chain, TrainConfig(**{**FAST, "max_length": 43}), tmp_path / "a")
    short = TrainConfig(**{**FAST, "max_length": 43, "max_steps": 4, "eval_every": 2})
    assert run_stream(toy_generative_stream(), model, lora, short, tmp_path / "b").matrix.R.shape == (3, 3)


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_fusion_routing_and_transfer_on_generative_tasks(tiny_lm_dir, tmp_path):
    """A finished generative run: continual fusion over the tasks' LoRAs trains and never forgets;
    routing picks a delta per example and generates through it (oracle ACC = the run's own
    scores); the transfer matrix scores every pair of tasks (text is one output space)."""
    import adapters
    from continual.studies.merge import merge_run
    from continual.studies.route import route_run
    from continual.studies.transfer import transfer_matrix

    fused = run_stream(toy_generative_stream(), adapters.DeltaModel.from_pretrained(str(tiny_lm_dir)),
                       make_strategy("per-task-fusion", LORA), GEN, tmp_path / "fusion")
    assert fused.metrics["BWT"] == 0.0 and np.all(np.isfinite(np.diag(fused.matrix.R)))
    stream = stream_from_yaml(toy_generative_yaml(tmp_path, {"b": "sari"}))  # route scores b against its prompts
    res = run_stream(stream, adapters.DeltaModel.from_pretrained(str(tiny_lm_dir)),
                     make_strategy("per-task", LORA), GEN, tmp_path / "run")
    routed, by_perplexity = route_run(tmp_path / "run", str(tiny_lm_dir), ["prototype", "perplexity"])
    assert routed.confusion.sum() == sum(len(t.test) for t in stream) == by_perplexity.confusion.sum()
    assert by_perplexity.oracle_accuracy == routed.oracle_accuracy
    np.testing.assert_allclose(list(routed.oracle_accuracy.values()), res.matrix.R[-1], atol=0.05)
    # the toy tasks share one prompt template, so the router cannot tell them apart: routed < oracle
    assert routed.routed_acc <= routed.oracle_acc
    transfer = transfer_matrix(tmp_path / "run", str(tiny_lm_dir))
    assert not np.isnan(transfer.accuracy).any()  # every pair of generative tasks is comparable
    assert "in brackets the score by the target's metric: " in transfer.table() and "accuracy" not in transfer.table()
    np.testing.assert_allclose(np.diag(transfer.accuracy), res.matrix.R[-1], atol=0.05)
    # one delta merged from the tasks' LoRAs answers every task through the shared LM head
    merged = merge_run(tmp_path / "run", ["linear", "ties"], backbone=str(tiny_lm_dir))
    assert merged.generative and "no task id" in merged.table() and np.isfinite(merged.scores["ties"]).all()
    np.testing.assert_allclose(merged.scores["own delta"], res.matrix.R[-1], atol=0.05)
    # a task's metric is part of its fingerprint: scored otherwise now, the run is refused, the task named
    from continual.rundir import RunStateError

    toy_generative_yaml(tmp_path, {"b": "rouge_l"})  # the same files, b scored by ROUGE-L instead of SARI
    with pytest.raises(RunStateError, match=r"task\(s\) b differ from the fingerprints .* a generative task's metric"):
        route_run(tmp_path / "run", str(tiny_lm_dir), ["prototype"])


@pytest.mark.integration  # end to end: a whole stream, resumed, logged or served
def test_t5_learns_generative_tasks(word_tokenizer, tmp_path):
    """An encoder-decoder (tiny random-init T5) runs the same stream: the prompt goes to the
    encoder, the answer is learned and generated by the decoder, and old tasks never change."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    import adapters

    tok = word_tokenizer
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                             vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                             decoder_start_token_id=tok.pad_token_id)).eval()
    model = adapters.DeltaModel(t5, tok, "tiny-t5")
    # the answer has to cross from encoder to decoder through a random cross-attention: LoRA on
    # four targets and more steps than the decoder-only test needs
    lora = [{"method": "lora", "rank": 8, "targets": ["query", "value", "attn_out", "ffn_out"]}]
    config = TrainConfig(**{**FAST, "max_steps": 200, "lr": 1e-2, "max_length": 32, "eval_every": 50})
    res = run_stream(toy_generative_stream(), model, make_strategy("per-task", lora), config, tmp_path / "t5")
    R = res.matrix.R
    assert np.all(np.diag(R) >= 0.9), R
    assert res.metrics["BWT"] == 0.0


def toy_generative_yaml(directory, metrics: dict[str, str] | None = None) -> str:
    """The toy generative stream as JSONL files and a stream YAML (a stream a run can rebuild);
    ``metrics``: a metric for some tasks (default exact match)."""
    rows = []
    for task in toy_generative_stream():
        path = directory / f"{task.name}.jsonl"
        task.train.to_pandas()[["text", "target"]].to_json(path, orient="records", lines=True)
        metric = f"    metric: {metrics[task.name]}\n" if task.name in (metrics or {}) else ""
        rows.append(f"  - name: {task.name}\n    train: {path}\n    target_column: target\n{metric}")
    (directory / "s.yaml").write_text("tasks:\n" + "".join(rows))
    return str(directory / "s.yaml")


def test_cli_runs_a_generative_yaml_stream(tiny_lm_dir, tmp_path, capsys):
    from continual.cli import main

    toy_generative_yaml(tmp_path)
    common = ["run", "--stream", str(tmp_path / "s.yaml"), "--steps", "5", "--batch-size", "8", "--max-length", "32",
              "--eval-every", "5", "--no-mlflow", "--no-progress"]
    assert main([*common, "--backbone", str(tiny_lm_dir), "--method", "lora", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "ACC=" in out and (tmp_path / "o" / "results.json").exists()
    # an encoder cannot answer in text: refused with the reason, nothing written
    assert main([*common, "--out", str(tmp_path / "enc")]) == 2
    assert "no language-model head" in capsys.readouterr().err and not (tmp_path / "enc").exists()


def test_a_task_knows_its_kind_and_every_output_names_its_score(lm_model, tmp_path):
    import csv
    import dataclasses
    import json

    from continual.metrics import AccuracyMatrix
    from streams import DataError, TaskStream

    stream = toy_generative_stream()
    tasks = [stream.tasks[0], dataclasses.replace(stream.tasks[1], metric="sari"), dataclasses.replace(stream.tasks[2], metric="rouge_l")]
    assert [t.kind for t in tasks] == ["generative"] * 3 and [t.score_name for t in tasks] == ["exact_match", "sari", "rouge_l"]
    with pytest.raises(DataError, match="is classification, but its splits are generative"):
        dataclasses.replace(tasks[0], kind="classification")
    from mlflow import MlflowClient

    from continual import MLflowLogger

    config = TrainConfig(**{**FAST, "max_steps": 2, "eval_every": 2})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_stream(TaskStream("mixed-scores", tasks), lm_model(), make_strategy("per-task", ["lora"]), config, tmp_path / "o",
                        loggers=[MLflowLogger(uri, "scores")])
    logged = MlflowClient(uri).get_run(result.tracking["parent_run_id"]).data.metrics
    assert {"exact_match/a", "sari/b", "rouge_l/c", "f1/c"} <= set(logged) and not any(k.startswith("acc/") for k in logged)
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["matrix"]
    assert saved["scores"] == ["exact_match", "sari", "rouge_l"] == result.matrix.scores
    # SARI scored too without the task id (each routed answer against its own prompt)
    assert all(0 <= row[1] <= 1 for row in saved["R_agnostic"][1:]) and 0 <= saved["b"][1] <= 1
    rows = list(csv.reader(open(tmp_path / "o" / "matrix.csv")))
    assert rows[1] == ["score", "exact_match", "sari", "rouge_l"]
    assert result.table().splitlines()[1].split() == ["score", "exact_match", "sari", "rouge_l"]
    old = {k: v for k, v in saved.items() if k != "scores"}  # a run saved before scores were named
    assert AccuracyMatrix.from_dict(old).scores == ["score"] * 3


def test_training_step_reads_the_lm_head_at_answer_positions_only(lm_model, word_tokenizer):
    """TrainStep computes a generative task's logits at its answer positions alone: the same loss
    and gradients as the whole (B, T, V) logits give, and logits of N rows (not B * T)."""
    import torch

    from continual.training import TrainStep, make_loader, token_loss

    task = toy_generative_stream()[0]
    data = tokenize(task.splits()["train"].select(range(6)), word_tokenizer, 32)
    batch = next(iter(make_loader(data, word_tokenizer, 6, shuffle=False)))
    labels = batch.pop("labels")
    answer = int((labels != -100).sum())
    assert 0 < answer < labels.numel()

    def step(compiled: bool) -> tuple[float, dict, tuple]:
        model = lm_model()
        model.add_task("g", LORA, generative=True)
        model.activate("g")
        params = [p for p in model.parameters() if p.requires_grad]
        seen = []
        ts = TrainStep(model, torch.optim.SGD(params, lr=0.0), extra_loss=lambda b, y, logits: seen.append(logits.shape))
        ts.compiled = compiled  # the whole-logits path, as a compiled step takes it (without compiling)
        loss = float(ts(dict(batch), labels.clone()))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, seen[0]

    loss, grads, shape = step(False)
    full_loss, full_grads, full_shape = step(True)
    assert shape[0] == answer and full_shape[:2] == labels.shape
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], full_grads[n], rtol=1e-4, atol=1e-7)
    with pytest.raises(Exception, match="generative"):
        m = lm_model()
        m.add_task("c", LORA, num_labels=2)
        m.activate("c")
        m(**batch, logit_positions=labels != -100)
