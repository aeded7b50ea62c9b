"""A :class:`~streams.TaskStream` as an Avalanche benchmark (needs the ``[avalanche]`` extra).

    from continual.strategies.avalanche import avalanche_benchmark
    bm = avalanche_benchmark(stream, model.tokenizer, max_length=64)
    for exp in bm.train_stream:            # one experience per task, task label = its index
        strategy.train(exp)

Text becomes tensors Avalanche can batch with its default collate: each example's ``x`` is a
``[3, 512]`` int64 tensor (token ids, attention mask, token type ids, zero-padded; the same width
for every task, so memories can mix tasks), ``y`` its label id in the task's own label space, ``t`` the task's index in the
stream (task-incremental: every task keeps its own head). Streams: ``train``, ``valid`` (our dev
split) and ``test``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from streams import Task, TaskStream

from ...training import tokenize

STREAM_NAMES = {"train": "train", "dev": "valid", "test": "test"}
FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def require_avalanche() -> None:
    """A clear error when the optional extra is missing."""
    import adapters  # noqa: F401  the torchvision workaround must run before avalanche imports it
    import importlib.util

    if importlib.util.find_spec("avalanche") is None:
        raise ImportError("the Avalanche baselines need the [avalanche] extra: run `bash scripts/install.sh --avalanche` "
                          "(it installs avalanche-lib with a torchvision that pairs with your torch)")


# Every task's examples are padded to one width, so that a replay memory or an A-GEM sample can
# batch examples of different tasks (Avalanche stacks them with its default collate). The model
# trims each batch to its longest row (AvalancheNet), so the padding costs memory, not compute.
PACK_WIDTH = 512


def pack(tokenised: Any, width: int = PACK_WIDTH) -> torch.Tensor:
    """``[N, 3, W]`` int64: ids, mask, token types of a tokenised ``datasets.Dataset``, right-padded
    with 0 (mask 0) to ``width`` (or to its longest row, if longer)."""
    rows = tokenised["input_ids"]
    if not rows:
        raise ValueError("cannot pack an empty split")
    length = max(width, max(len(r) for r in rows))
    out = torch.zeros(len(rows), 3, length, dtype=torch.long)
    masks = tokenised["attention_mask"] if "attention_mask" in tokenised.column_names else None
    types = tokenised["token_type_ids"] if "token_type_ids" in tokenised.column_names else None
    for i, ids in enumerate(rows):
        n = len(ids)
        out[i, 0, :n] = torch.tensor(ids)
        out[i, 1, :n] = torch.tensor(masks[i]) if masks is not None else 1
        if types is not None:
            out[i, 2, :n] = torch.tensor(types[i])
    return out


def tensor_dataset(x: torch.Tensor, y: torch.Tensor, task_labels: int | Sequence[int]) -> Any:
    """Packed inputs, label ids and task label(s) as an Avalanche task-aware classification dataset."""
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    return _make_taskaware_tensor_classification_dataset(x, y, task_labels=task_labels, targets=y)


def task_dataset(task: Task, index: int, split: str, tokenizer: Any, max_length: int) -> Any:
    """One split of one task as an Avalanche task-aware classification dataset."""
    data = tokenize(getattr(task, split), tokenizer, task.max_length or max_length)
    return tensor_dataset(pack(data), torch.tensor(data["label"], dtype=torch.long), index)


def task_experience(tokenised: Any, index: int) -> Any:
    """One tokenised split as a single Avalanche experience with task label ``index`` (what a
    strategy trains on when our scheduler hands it one task at a time)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    data = tensor_dataset(pack(tokenised), torch.tensor(tokenised["label"], dtype=torch.long), index)
    exp = with_task_labels(DatasetExperience(dataset=data, current_experience=index))
    exp.classes_in_this_experience = data.targets.uniques  # what multi-task modules adapt to
    return exp


def avalanche_benchmark(stream: TaskStream, tokenizer: Any, max_length: int = 128,
                        splits: Sequence[str] = ("train", "dev", "test")) -> Any:
    """The stream as an Avalanche ``CLScenario`` with ``train_stream``, ``valid_stream`` (dev) and
    ``test_stream``; experience ``j`` holds task ``j`` with task label ``j``."""
    require_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    unknown = [s for s in splits if s not in STREAM_NAMES]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; use {list(STREAM_NAMES)}")
    streams = {STREAM_NAMES[s]: [task_dataset(t, j, s, tokenizer, max_length) for j, t in enumerate(stream)] for s in splits}
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))
