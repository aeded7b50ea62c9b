"""``lamol``: one shared delta on a decoder that learns to answer each task *and* to write examples
of it; before each new task it writes pseudo-examples of the earlier ones, replayed with the new data.

LAMOL, Sun, Ho and Lee, "LAMOL: LAnguage MOdeling for Lifelong Language Learning" (ICLR 2020,
arXiv:1909.03329; in the LLM continual-learning toolkits, e.g. EasyCL). Every task is text in, text
out, so one language model does both jobs. An example is trained twice over:

- as a question: ``prompt ANS answer EOS``, learning the answer's tokens (L_QA), and
- as a language-model sample: ``GEN prompt ANS answer EOS``, learning every token after ``GEN``
  (L_LM), so the model can later write whole examples of the task from ``GEN`` alone;

the step's loss is ``L_QA + λ L_LM`` (the paper's λ = 0.25). Before task t (t > 1), the model
samples ``γ |D_t|`` pseudo-examples (the paper's γ = 0.2), top-k sampling with k = 20, from the
generation token; those that do not come back as ``prompt ANS answer EOS`` are dropped, and the
rest are trained with D_t, under both losses, as if they were real. This is the paper's
task-specific variant (LAMOL^TASK): each task has its own generation token, and the pseudo-examples
are split evenly over the earlier tasks, so every earlier task is written for. Nothing of an
earlier task is stored (no memory of examples); scoring needs no task id (the shared delta and
the language model's own head answer every task).

How we depart from the paper:

- The backbone is frozen, so no new tokens are added to its vocabulary: the generation token of
  task ``name`` is the text ``__name__`` and ``ANS`` the text ``" __ans__"``, each as the tokenizer
  cuts it, and the answer is found in a pseudo-example by that token sequence. Our questions have
  no ``ANS`` between prompt and answer (the templates end in "Answer:"), so L_QA trains on the
  question exactly as every other strategy does; only the language-model sample carries ``ANS``.
- The paper adds the pseudo-examples to the new task's data set (so they are a share γ / (1 + γ)
  of every epoch). Our loop draws batches of the new data alone, so each step also trains a small
  batch of pseudo-examples (``pseudo_batch``, default γ times the batch size, at least 1) whose
  mean loss is weighted by γ: the same expected gradient as the mixed data set.
- The language-model terms and the pseudo-examples' loss run in one extra forward pass per step
  (every sequence of the step's language-model samples and pseudo-examples padded into one batch).
- A pseudo-example must fit the new task's length (prompt + answer + EOS, its answer within the
  answer room a real one keeps), else it is dropped; the run says how many were kept per task,
  and writes them to ``reports/<task>/pseudo-examples.jsonl``.
- Only decoder-only backbones with generative tasks (the paper's setting); a classification task,
  or an encoder-decoder (T5), is refused before anything runs.

The paper fine-tunes all of GPT-2 for several epochs a task; a pseudo-example comes back
well-formed only once the delta has learnt to write the task's prompts, so with a LoRA and short
tasks few do (SmolLM2, 100 steps on 64 examples a task: 0 to 8 of 13 kept; see
benchmarks/results/forgetting-methods-cpu.md), and the run says so per task.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adapters import DeltaModel
from adapters.generation import generate
from adapters.model import MethodSpec
from adapters.precision import autocast, inference_linears, resolve_precision
from streams import Task, TaskStream

from ..training import TrainConfig
from ..training.config import position_limit
from ..training.data import answer_room
from .base import check_option
from .shared_delta import _SharedDelta

ANSWER = " __ans__"  # the answer marker, as text (no new vocabulary on a frozen backbone)

Row = tuple[str, list[int], list[int]]  # (task, prompt ids, answer ids ending in EOS)


def generation_token(name: str) -> str:
    """The text that starts a language-model sample of task ``name`` (LAMOL^TASK's token)."""
    return f"__{name}__"


def split_sample(ids: Sequence[int], marker: Sequence[int], ended: bool) -> tuple[list[int], list[int]] | None:
    """A written sample ``prompt marker answer`` as (prompt, answer), or None where it is not one:
    it did not end (no EOS), has no prompt or no answer, or not exactly one marker."""
    m = len(marker)
    at = [i for i in range(len(ids) - m + 1) if list(ids[i:i + m]) == list(marker)]
    if not ended or len(at) != 1 or at[0] == 0 or at[0] + m == len(ids):
        return None
    return list(ids[:at[0]]), list(ids[at[0] + m:])


def padded(seqs: Sequence[tuple[list[int], int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and shifted labels of sequences given as
    (ids, first learned token): position i learns token i + 1 where i + 1 >= the first learned."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (s, first) in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        labels[r, first - 1:len(s) - 1] = torch.tensor(s[first:])
    return ids.to(device), mask.to(device), labels.to(device)


class LAMOL(_SharedDelta):
    name = "lamol"
    description = ("one shared delta on a decoder that also learns to write each task's examples; before each "
                   "task it writes pseudo-examples of the earlier ones and trains on them too (LAMOL)")
    defaults = {"lm_lambda": 0.25, "gamma": 0.2, "top_k": 20, "pseudo_batch": None}
    classification_tasks = False
    data_parallel = False
    data_parallel_why = "its language-model term and pseudo-examples run outside the data-parallel model"

    def __init__(self, methods: Sequence[MethodSpec] = ("lora",), lm_lambda: float = 0.25, gamma: float = 0.2,
                 top_k: int = 20, pseudo_batch: int | None = None) -> None:
        super().__init__(methods)
        check_option(self.name, "lm_lambda", lm_lambda, lambda v: 0 <= v < math.inf, "a number >= 0")
        check_option(self.name, "gamma", gamma, lambda v: 0 <= v <= 100, "a number in [0, 100]")
        check_option(self.name, "top_k", top_k, lambda v: v >= 1, "an integer >= 1", integer=True)
        if pseudo_batch is not None:
            check_option(self.name, "pseudo_batch", pseudo_batch, lambda v: v >= 1, "an integer >= 1", integer=True)
        self.lm_lambda, self.gamma, self.top_k, self.pseudo_batch = lm_lambda, gamma, top_k, pseudo_batch
        self.pseudo: list[Row] = []  # the pseudo-examples of the task training now
        self._texts: dict[str, list[dict[str, str]]] = {}  # task -> its pseudo-examples as text (a report)

    def check_stream(self, stream: TaskStream, model: DeltaModel, max_length: int | None = None) -> None:
        super().check_stream(stream, model, max_length)  # (classification tasks are refused there)
        if model.seq2seq:
            raise ValueError(f"lamol trains a decoder-only language model to answer every task and to write examples "
                             f"of it, and the backbone {model.backbone_name!r} is an encoder-decoder; use a decoder "
                             "(e.g. --backbone smollm2)")
        limit = position_limit(model)
        if limit is None or not len(stream):
            return
        # the longest language-model sample, trained or written: any task's generation token, then a
        # prompt and answer as long as the longest task's (an earlier task is written at a later one's
        # length), and the marker
        token = max(len(self._ids(model, generation_token(t.name))) for t in stream)
        reach = token + len(self._ids(model, ANSWER)) + max(t.max_length or max_length or 0 for t in stream)
        if reach > limit:
            raise ValueError(f"lamol: the stream's language-model samples reach position {reach}, past the {limit} of "
                             f"the backbone {model.backbone_name!r}; use a shorter max_length")

    def _ids(self, model: DeltaModel, text: str) -> list[int]:
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def train(self, model, tasks, config, data, callback):
        (task,) = tasks
        earlier = self.earlier_tasks(model, task)
        self.pseudo = self._write(model, task, earlier, config, len(data(task)["train"])) if earlier else []
        try:
            return super().train(model, tasks, config, data, callback)
        finally:
            self.pseudo = []

    def _write(self, model: DeltaModel, task: Task, earlier: list[str], config: TrainConfig, n_train: int) -> list[Row]:
        """Sample γ |D_t| pseudo-examples, split evenly over the earlier tasks, keeping those that
        come back as ``prompt ANS answer EOS`` and fit the new task's length."""
        start, tok = time.perf_counter(), model.tokenizer
        marker, eos = self._ids(model, ANSWER), tok.eos_token_id
        width = config.max_length + len(marker)  # prompt + marker + answer (+ EOS, which is not returned)
        share, extra = divmod(math.ceil(self.gamma * n_train), len(earlier))
        gen = torch.Generator(device=model.device).manual_seed(config.seed)
        precision = resolve_precision(config.precision, model.device)
        counts = [max(1, share + (1 if i < extra else 0)) if self.gamma > 0 else 0 for i in range(len(earlier))]
        rows: list[Row] = []
        bar = tqdm(total=sum(counts), desc=f"task {task.name}: pseudo-examples", disable=not config.progress, leave=False)
        # the frozen weights copied once for every earlier task's batches (what changes between
        # tasks is which deltas act, not the backbone)
        with autocast(precision, model.device), inference_linears(model):
            for name, n in zip(earlier, counts):
                prefix = self._ids(model, generation_token(name))
                for b in range(0, n, config.batch_size * 2):
                    size = min(config.batch_size * 2, n - b)
                    ids = torch.tensor([prefix] * size, device=model.device)
                    with model.acting(*self.trains_with(name)):
                        new_rows = generate(model, ids, max_new_tokens=width, top_k=self.top_k, generator=gen)
                    for new in new_rows:
                        parts = split_sample(new, marker, ended=len(new) < width)
                        if parts and len(parts[1]) <= answer_room(config.max_length) and \
                                len(parts[0]) + len(parts[1]) + 1 <= config.max_length:
                            rows.append((name, parts[0], parts[1] + [eos]))
                    bar.update(size)
        bar.close()
        self._texts[task.name] = [{"task": n, "prompt": tok.decode(p), "answer": tok.decode(a[:-1]).strip()}
                                  for n, p, a in rows]
        tqdm.write(f"task {task.name} (lamol): {len(rows)} of {sum(counts)} pseudo-examples of {len(earlier)} earlier "
                   f"task(s) kept, written in {time.perf_counter() - start:.0f} s")
        return rows

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        tok = model.tokenizer
        marker, pad = self._ids(model, ANSWER), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prefixes = {n: self._ids(model, generation_token(n)) for n in {task.name, *(r[0] for r in self.pseudo)}}
        pseudo, size = self.pseudo, self.pseudo_batch or max(1, round(self.gamma * config.batch_size))
        gen = torch.Generator().manual_seed(config.seed)  # seeded by the step's seed: a resumed run draws the same
        weights = (self.lm_lambda, self.gamma, self.gamma * self.lm_lambda)

        def term(batch: dict[str, torch.Tensor], labels: torch.Tensor, _logits: torch.Tensor) -> torch.Tensor | None:
            answer = batch.get("logit_positions")
            answer = labels != -100 if answer is None else answer  # a compiled step keeps (B, T) labels
            if not self.lm_lambda and not pseudo:
                return None
            seqs, groups = [], []  # group 0: the batch's LM samples; 1: pseudo questions; 2: pseudo LM samples
            rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), answer.tolist())
            for ids, mask, ans in rows if self.lm_lambda else ():
                p, n = ans.index(True) + 1, sum(mask)  # right-padded: the answer starts after the first learned position
                seqs.append((prefixes[task.name] + ids[:p] + marker + ids[p:n], len(prefixes[task.name])))
                groups.append(0)
            for i in (torch.randint(len(pseudo), (size,), generator=gen).tolist() if pseudo else ()):
                name, p, a = pseudo[i]
                seqs += [(p + a, len(p)), (prefixes[name] + p + marker + a, len(prefixes[name]))]
                groups += [1, 2]
            ids, mask, lab = padded(seqs, pad, model.device)
            learned = lab != -100
            out = model(input_ids=ids, attention_mask=mask, logit_positions=learned)
            losses = torch.nn.functional.cross_entropy(out.float(), lab[learned], reduction="none")
            group = torch.tensor(groups, device=model.device).unsqueeze(1).expand_as(lab)[learned]
            return sum(w * losses[group == g].mean() for g, w in enumerate(weights) if w and bool((group == g).any()))
        return term

    def reports(self, model: DeltaModel, task: Task, loader: Any, directory: Path) -> dict[str, Path]:
        """The pseudo-examples written for ``task``'s step (as text, one JSON object a line)."""
        texts = self._texts.pop(task.name, None)
        if texts is None:
            return {}
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "pseudo-examples.jsonl"
        path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        return {"pseudo-examples": path}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lm_lambda": self.lm_lambda, "gamma": self.gamma, "top_k": self.top_k,
                "pseudo_batch": self.pseudo_batch}
