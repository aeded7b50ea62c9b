"""Text to batches: tokenising, padded and length-bucketed loaders, endless training batches.

Two kinds of data, told apart by their columns: classification (``text`` [+ ``text_pair``],
``label``) and generative (``text`` = the prompt, ``target`` = the answer). For a decoder a
generative example is tokenised once as prompt + target + end-of-sequence, and training batches
carry per-token ``labels`` already shifted (the id of the *next* token, -100 on the prompt and
padding); for an encoder-decoder (``decoder_start`` given) the prompt is the encoder's input and
the batches carry ``decoder_input_ids`` (the target shifted right after the start token) and the
target as ``labels``. Either way the training step computes one cross-entropy for both kinds of
task. Evaluation batches carry the left-padded prompt alone and the reference text, and are
scored by generation (:mod:`continual.training.evaluate`).
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from streams.catalog import cap_indices

from .textscore import SOURCE_SCORERS


def _quiet_map(dataset: Dataset, fn: Callable, remove: list[str]) -> Dataset:
    # datasets' own per-map progress bar is noise next to the training bar
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # Without a fingerprint given, datasets hashes ``fn`` with dill to name a cache file, and
        # with it the tokenizer it closes over (its whole vocabulary): 0.08 s a split for MiniLM's
        # in a run, 0.4 s in the test process, longer than tokenising a capped split (0.004 s for
        # 100 rows). The result is kept in memory, so no cache file is
        # written or read and the fingerprint names nothing: a fresh one costs nothing and can
        # never pick up another tokenizer's cached ids.
        return dataset.map(fn, batched=True, remove_columns=remove, keep_in_memory=True,
                           new_fingerprint=uuid.uuid4().hex)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def tokenize(dataset: Dataset, tokenizer: Any, max_length: int, metric: str | None = None,
             decoder_start: int | None = None) -> Dataset:
    """Token ids for a classification dataset (``text``, optional ``text_pair``, ``label``) or a
    generative one (``text``, ``target``; ``metric`` names how its answers are scored;
    ``decoder_start``: the decoder start token of an encoder-decoder, None for a decoder)."""
    if "input_ids" in dataset.column_names:  # already tokenised (a stream tokenises each split once)
        return dataset
    if "target" in dataset.column_names:
        if decoder_start is not None:
            return _tokenize_seq2seq(dataset, tokenizer, max_length, metric or "exact", decoder_start)
        return _tokenize_generative(dataset, tokenizer, max_length, metric or "exact")
    pair = "text_pair" in dataset.column_names

    def enc(batch: dict[str, list]) -> dict[str, list]:
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    return _quiet_map(dataset, enc, [c for c in dataset.column_names if c != "label"])


def answer_room(max_length: int) -> int:
    """Answer tokens a decoder's generative example keeps at ``max_length`` (before its eos)."""
    return max(1, max_length // 2) - 1


def check_generative_length(max_length: int) -> None:
    """Refuse a length that leaves a decoder's answer no token (it would learn only to stop)."""
    if answer_room(max_length) < 1:
        raise ValueError(f"max_length {max_length} leaves a generative task's answer no token (it gets half the length, "
                         "one of them the end of sequence); use at least 4")


def generation_reach(max_length: int) -> int:
    """Positions a decoder's scoring can reach at ``max_length``: a prompt of up to max_length - 1
    tokens (the answer keeps at least its end of sequence) and then the longest answer generated,
    which is the longest reference kept: up to the answer room and its end of sequence."""
    return max_length - 1 + answer_room(max_length) + 1


def check_generation_room(model: Any, max_length: int, added: int = 0) -> None:
    """A decoder with a table of absolute positions (GPT-2's) has none past it: scoring a task at
    ``max_length`` runs prompt + generated answer through it, and past the table that was an index
    error (a device assert on a GPU) after the first task had trained. Refused before anything runs.
    ``added``: the positions the task's methods prepend (prompt tuning's tokens)."""
    from adapters.peft_export import rope_of

    from .config import position_limit

    limit = position_limit(model)
    if limit is None or model.seq2seq or rope_of(model.backbone) is not None or added + generation_reach(max_length) <= limit:
        return  # relative or rotary positions (T5, Llama-family) have no table to run past
    fits = next((n for n in range(max_length, 0, -1) if added + generation_reach(n) <= limit), 0)
    raise ValueError(f"max_length {max_length}: scoring a generative task reaches position {added + generation_reach(max_length)} "
                     f"({f'{added} prepended, ' if added else ''}prompt, then the generated answer), past the {limit} of the "
                     f"backbone {model.backbone_name!r} (absolute positions); use a max_length of at most {fits}"
                     + (" or prepend fewer positions" if added else ""))


def answers_cut(dataset: Dataset) -> int:
    """How many of a tokenised generative split's answers were cut to fit the length."""
    return sum(dataset["answer_cut"]) if "answer_cut" in dataset.column_names else 0


def prompts_cut(dataset: Dataset) -> int:
    """How many of a tokenised generative split's prompts lost their start to fit the length (an
    instruction placed first, as TRACE's are, goes with it)."""
    return sum(dataset["prompt_cut"]) if "prompt_cut" in dataset.column_names else 0


def _tokenize_generative(dataset: Dataset, tokenizer: Any, max_length: int, metric: str) -> Dataset:
    """prompt + target + eos, truncated to ``max_length``: the target keeps up to half of it, the
    prompt loses tokens from its start (templates put the question last)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("generative tasks need a tokenizer with an end-of-sequence token")

    check_generative_length(max_length)

    def enc(batch: dict[str, list]) -> dict[str, list]:
        prompts = tokenizer(batch["text"])["input_ids"]
        targets = tokenizer([" " + t.strip() for t in batch["target"]], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "lm_labels": [], "prompt_len": [], "metric": [],
                                "answer_cut": [], "prompt_cut": []}
        for p, t in zip(prompts, targets):
            out["answer_cut"].append(len(t) > answer_room(max_length))
            t = t[: answer_room(max_length)] + [tokenizer.eos_token_id]
            out["prompt_cut"].append(len(p) > max_length - len(t))
            p = p[-(max_length - len(t)):]
            ids = p + t
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            # shifted: position i predicts token i + 1; only the target's tokens are learned
            out["lm_labels"].append([-100] * (len(p) - 1) + t + [-100])
            out["prompt_len"].append(len(p))
            out["metric"].append(metric)
        return out

    return _quiet_map(dataset, enc, [c for c in dataset.column_names if c not in ("target", "label")])


def _tokenize_seq2seq(dataset: Dataset, tokenizer: Any, max_length: int, metric: str, start: int) -> Dataset:
    """The prompt (the encoder's input, its start cut when too long) and target + eos (the
    decoder's), each up to ``max_length``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("generative tasks need a tokenizer with an end-of-sequence token")

    def enc(batch: dict[str, list]) -> dict[str, list]:
        prompts = tokenizer(batch["text"])["input_ids"]
        targets = tokenizer([t.strip() for t in batch["target"]], add_special_tokens=False)["input_ids"]
        ids = [p[-max_length:] for p in prompts]
        return {"input_ids": ids, "attention_mask": [[1] * len(p) for p in ids], "prompt_len": [len(p) for p in ids],
                "target_ids": [t[: max_length - 1] + [tokenizer.eos_token_id] for t in targets],
                "decoder_start": [start] * len(ids), "metric": [metric] * len(ids),
                "answer_cut": [len(t) > max_length - 1 for t in targets],
                "prompt_cut": [len(p) > max_length for p in prompts]}

    return _quiet_map(dataset, enc, [c for c in dataset.column_names if c not in ("target", "label")])


def is_generative(dataset: Dataset) -> bool:
    return "target" in dataset.column_names


def length_order(dataset: Dataset) -> list[int]:
    """Positions of a tokenised split's examples, shortest input first (a generative example's
    prompt, without its answer), ties in split order: batches cut from it pad little."""
    lengths = dataset["prompt_len"] if "prompt_len" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def _collate(dataset: Dataset, tokenizer: Any, pad_multiple: int | None) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    if "target_ids" in dataset.column_names:
        return partial(_collate_seq2seq, tokenizer=tokenizer, pad_multiple=pad_multiple)
    if is_generative(dataset):
        return partial(_collate_lm, tokenizer=tokenizer, pad_multiple=pad_multiple)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad([{c: r[c] for c in columns} for r in rows], return_tensors="pt", pad_to_multiple_of=pad_multiple)
        padded["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(padded)

    return collate


def _collate_lm(rows: list[dict[str, Any]], tokenizer: Any, pad_multiple: int | None) -> dict[str, torch.Tensor]:
    """Right-padded prompt + target, with the shifted per-token labels padded with -100."""
    padded = tokenizer.pad([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                           return_tensors="pt", pad_to_multiple_of=pad_multiple, padding_side="right")
    width = padded["input_ids"].shape[1]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r["lm_labels"])] = torch.tensor(r["lm_labels"])
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}


def _collate_seq2seq(rows: list[dict[str, Any]], tokenizer: Any, pad_multiple: int | None) -> dict[str, torch.Tensor]:
    """Right-padded prompts; the decoder's input is the target shifted right after the start token,
    its labels the target (-100 past each row's end)."""
    padded = tokenizer.pad([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                           return_tensors="pt", pad_to_multiple_of=pad_multiple, padding_side="right")
    width = max(len(r["target_ids"]) for r in rows)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    decoder = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    for i, r in enumerate(rows):
        t = torch.tensor(r["target_ids"])
        labels[i, : len(t)] = t
        decoder[i, 0] = r["decoder_start"]
        decoder[i, 1: len(t)] = t[:-1]
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "decoder_input_ids": decoder,
            "labels": labels}


class GenerationLoader:
    """Evaluation batches of a generative data set: left-padded prompts (``input_ids``,
    ``attention_mask``) and the reference answers (``references``). ``metric`` and
    ``max_new_tokens`` (the longest reference, end-of-sequence included) say how to score it."""

    generative = True

    def __init__(self, dataset: Dataset, tokenizer: Any, batch_size: int) -> None:
        self.dataset, self.tokenizer, self.batch_size = dataset, tokenizer, batch_size
        metrics = set(dataset["metric"])
        if len(metrics) != 1:
            raise ValueError(f"a generative data set is scored by one metric, found {sorted(metrics)}")
        self.metric = metrics.pop()
        if "target_ids" in dataset.column_names:  # encoder-decoder: the target is the decoder's alone
            lengths = [len(t) for t in dataset["target_ids"]]
        else:
            lengths = [len(ids) - p for ids, p in zip(dataset["input_ids"], dataset["prompt_len"])]
        # as long as the longest reference (cut to the length training keeps): a fixed cap of 32
        # tokens scored TRACE's summaries and code (ROUGE-L) on their first 31 tokens, without a word
        self.max_new_tokens = max(lengths)

    def subset(self, dataset: Dataset) -> "GenerationLoader":
        """A loader over part of this one's data set, scored and answered as the whole set is
        (its metric and answer length), for sharded evaluation; the part may be empty."""
        part = object.__new__(GenerationLoader)
        part.dataset, part.tokenizer, part.batch_size = dataset, self.tokenizer, self.batch_size
        part.metric, part.max_new_tokens = self.metric, self.max_new_tokens
        return part

    def by_length(self) -> tuple["GenerationLoader", list[int]]:
        """A loader over the same examples ordered by prompt length (so each batch pads little:
        less prefill work, shorter attention), and each of its examples' position in this one."""
        order = length_order(self.dataset)
        return self.subset(self.dataset.select(order)), order

    def references(self) -> list[str]:
        """The reference answers, in order."""
        return list(self.dataset["target"])

    def sources(self) -> list[str]:
        """The prompts as text, in order (decoded from the tokens the model reads, so cut where
        they were cut): what a score that judges an answer against its prompt (SARI) needs."""
        rows = self.dataset
        return self.tokenizer.batch_decode([ids[:p] for ids, p in zip(rows["input_ids"], rows["prompt_len"])],
                                           skip_special_tokens=True)

    def metric_sources(self) -> list[str] | None:
        """:meth:`sources` where the loader's metric judges an answer against its prompt, else None
        (no decoding where no score reads them)."""
        return self.sources() if self.metric in SOURCE_SCORERS else None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.dataset), self.batch_size):
            rows = self.dataset[start : start + self.batch_size]
            prompts = [{"input_ids": ids[:p]} for ids, p in zip(rows["input_ids"], rows["prompt_len"])]
            padded = self.tokenizer.pad(prompts, return_tensors="pt", padding_side="left")
            yield {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                   "references": list(rows["target"])}


def collate_rows(dataset: Dataset, indices: Sequence[int], tokenizer: Any) -> dict[str, torch.Tensor]:
    """One training batch of the tokenised ``dataset``'s rows ``indices`` (e.g. a replay memory's)."""
    return _collate(dataset, tokenizer, None)([dataset[int(i)] for i in indices])


def make_loader(dataset: Dataset, tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Dynamically padded batches; shuffling is seeded."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_collate(dataset, tokenizer, None),
                      generator=gen, pin_memory=torch.cuda.is_available())


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Seeded batches of similar lengths: shuffle, sort each pool of ``pool`` batches by length,
    cut it into batches, shuffle the batch order. Every example appears once; padding (and so
    wasted compute) drops to what the length spread inside a batch needs."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def bucketed_loader(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int) -> DataLoader:
    """Length-bucketed, seeded batches padded to a multiple of 8 (tensor-core friendly shapes)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return DataLoader(dataset, batch_sampler=bucket_batches(lengths, batch_size, seed),
                      collate_fn=_collate(dataset, tokenizer, 8), pin_memory=torch.cuda.is_available())


def eval_loader(dataset: Dataset, tokenizer: Any, max_length: int, batch_size: int = 64, *,
                metric: str | None = None, decoder_start: int | None = None) -> DataLoader | GenerationLoader:
    """Tokenised, unshuffled batches for evaluation (prompts to answer, for a generative set;
    ``metric`` and ``decoder_start`` as in :func:`tokenize`)."""
    dataset = tokenize(dataset, tokenizer, max_length, metric, decoder_start)
    if is_generative(dataset):
        return GenerationLoader(dataset, tokenizer, batch_size)
    return make_loader(dataset, tokenizer, batch_size, False)


def endless_batches(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int, bucket: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffled batches: epoch e is shuffled with seed + e."""
    epoch = 0
    while True:
        if bucket:
            yield from bucketed_loader(dataset, tokenizer, batch_size, seed + epoch)
        else:
            yield from make_loader(dataset, tokenizer, batch_size, True, seed + epoch)
        epoch += 1


def task_loader(task: Any, split: str, model: Any, max_length: int, batch_size: int = 64) -> DataLoader | GenerationLoader:
    """Evaluation batches of one split of a :class:`~streams.Task` for ``model`` (its tokenizer;
    its decoder start token, for an encoder-decoder; the task's metric, for a generative task)."""
    return eval_loader(getattr(task, split), model.tokenizer, max_length, batch_size,
                       metric=getattr(task, "metric", None), decoder_start=getattr(model, "decoder_start_id", None))


def sample_rows(dataset: Dataset, cap: int | None, seed: int) -> list[int]:
    """At most ``cap`` row indices of ``dataset`` in file order: all of them, or a seeded sample
    that keeps the label proportions (what routers are fitted on, what a Fisher or an input
    covariance is estimated from). The first rows had been taken: in a file sorted by label, one
    label only."""
    labels = np.asarray(dataset["label"]) if "label" in dataset.column_names else np.zeros(len(dataset), dtype=np.int64)
    if cap is not None and cap < len(np.unique(labels)):
        # fewer rows asked than there are labels: no proportion survives rounding (each share is
        # zero), and refusing here stopped a run after its first task had trained; a seeded draw
        return np.sort(np.random.default_rng(seed).choice(len(labels), cap, replace=False)).tolist()
    return np.sort(cap_indices(np.arange(len(dataset)), labels, cap, seed)).tolist()


def majority_rate(dataset: Dataset) -> float:
    """Accuracy of always predicting the most frequent label: the baseline to beat."""
    labels = np.asarray(dataset["label"])
    return float(np.bincount(labels).max() / len(labels))
