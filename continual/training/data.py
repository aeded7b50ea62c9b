"""Text to batches: tokenising, padded and length-bucketed loaders, endless training batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader


def tokenize(dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """Token ids for a dataset with ``text`` (and optional ``text_pair``) and ``label`` columns."""
    if "input_ids" in dataset.column_names:  # already tokenised (a stream tokenises each split once)
        return dataset
    pair = "text_pair" in dataset.column_names

    def enc(batch: dict[str, list]) -> dict[str, list]:
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    keep = {"label"}
    # datasets' own per-map progress bar is noise next to the training bar
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return dataset.map(enc, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep])
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _collate(dataset: Dataset, tokenizer: Any, pad_multiple: int | None) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad([{c: r[c] for c in columns} for r in rows], return_tensors="pt", pad_to_multiple_of=pad_multiple)
        padded["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(padded)

    return collate


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


def eval_loader(dataset: Dataset, tokenizer: Any, max_length: int, batch_size: int = 64) -> DataLoader:
    """Tokenised, unshuffled batches for evaluation."""
    return make_loader(tokenize(dataset, tokenizer, max_length), tokenizer, batch_size, False)


def endless_batches(dataset: Dataset, tokenizer: Any, batch_size: int, seed: int, bucket: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffled batches: epoch e is shuffled with seed + e."""
    epoch = 0
    while True:
        if bucket:
            yield from bucketed_loader(dataset, tokenizer, batch_size, seed + epoch)
        else:
            yield from make_loader(dataset, tokenizer, batch_size, True, seed + epoch)
        epoch += 1


def majority_rate(dataset: Dataset) -> float:
    """Accuracy of always predicting the most frequent label: the baseline to beat."""
    labels = np.asarray(dataset["label"])
    return float(np.bincount(labels).max() / len(labels))
