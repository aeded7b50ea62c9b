"""Routing by the deltas' own confidence: AdapterCL's perplexity selection.

Madotto et al. 2021, "Continual Learning in Task-Oriented Dialogue Systems" (EMNLP 2021; AdapterCL):
one adapter per task on a frozen GPT-2; an input that comes without its task id is given to the
adapter under which it is least surprising. The input's perplexity is computed with each task's
adapter in turn, and the lowest wins. Nothing is fitted and nothing is kept from training; the
price is one forward pass per task so far for every input, where the embedding routers
(:mod:`fusion.routing`) pay one pass of the bare backbone.

Here the surprise of an input under a task is computed with that task's deltas and head acting
(the run's ``strategy.active``): on a generative task, the mean negative log-likelihood of the
prompt's tokens, each given the ones before it (the logarithm of the prompt's perplexity: the
same order). Departures from the paper:

- a classification task has no text perplexity: its surprise is the entropy of its head's
  predicted label distribution divided by log(number of labels) (0: sure, 1: uniform), the
  criterion by which Wortsman et al. 2020 ("Supermasks in Superposition", NeurIPS; SupSup) infer a
  task, lowest output entropy; normalised, because heads of different sizes are compared;
- a stream that mixes classification and generative tasks is refused (an entropy and a
  perplexity do not compare), and so is a generative task on an encoder-decoder (T5's prompt is
  read by its encoder: the model gives no probability of it);
- AdapterCL scores the dialogue history; here the task's prompt as the model reads it (cut to the
  task's ``max_length``).

Where tasks answer through one function (one shared delta on generative tasks, which share the LM
head: seq-delta, o-lora, ...), every task is equally surprised and the first one is picked: the
routing accuracy then measures nothing, while the answers, and so A, are R's.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from adapters.errors import non_finite_rows, refuse_non_finite
from adapters.precision import autocast, inference_linears, resolve_precision


class PerplexityRouter:
    """An example goes to the task whose deltas find it least surprising (see the module
    docstring). ``predict`` reads an (examples, tasks) matrix of :func:`surprise` columns, one per
    task in the order they were added, not embeddings (``reads = "surprise"``)."""

    name = "perplexity"
    summary = ("the task whose delta and head find the input least surprising (AdapterCL's selection); "
               "one pass per task so far for each input")
    reads = "surprise"

    def __init__(self) -> None:
        self.tasks: list[str] = []

    def add_task(self, task: str, embeddings: Any = None, labels: Any = None) -> None:
        """Only the task's place: this router fits nothing (the embeddings, if given, are not read)."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} is already in the router; each task is added once")
        self.tasks.append(task)

    def predict(self, surprises: torch.Tensor) -> torch.Tensor:
        if not self.tasks:
            raise ValueError("the router has no tasks yet: add_task before predict")
        if surprises.dim() != 2 or surprises.shape[1] != len(self.tasks):
            raise ValueError(f"surprises must be (examples, {len(self.tasks)}): one column per task, got shape "
                             f"{tuple(surprises.shape)}")
        return surprises.argmin(1)

    @staticmethod
    def refusal(generative: Sequence[bool], encoder_decoder: bool) -> str | None:
        """Why this router cannot route a stream whose tasks are ``generative`` (one flag per task)
        on a model that is (or is not) an encoder-decoder; None where it can."""
        if any(generative) and not all(generative):
            return ("the perplexity router compares a classifier's entropy with other classifiers' and a prompt's "
                    "perplexity with other tasks' perplexities; this stream mixes both kinds of task")
        if any(generative) and encoder_decoder:
            return ("the perplexity router needs the probability of the prompt, which an encoder-decoder "
                    "(T5) reads with its encoder and does not give")
        return None


def _right_padded(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device``, left-padded rows (prompts, as they are batched for
    generation) moved to the start of their rows, so each token sits at the position it has when
    the prompt is read alone; every tensor of the ids' shape (token types) moves with them."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    shift = mask.ne(0).int().argmax(1, keepdim=True)  # leading padding only: a right-padded row stays as it is
    index = (torch.arange(ids.shape[1], device=device) + shift) % ids.shape[1]
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k != "labels":
            v = v.to(device)
            out[k] = v.gather(1, index) if v.shape == ids.shape else v
    return out


@torch.no_grad()
def surprise(model: Any, batches: Any, active: Sequence[str], precision: str = "fp32") -> torch.Tensor:
    """Per example of tokenised ``batches``, in order: how surprising it is to ``active``'s deltas
    and last head (dropout off). A classifier's normalised entropy (a one-label head: 1); a generative task's prompt
    (left- or right-padded ``input_ids`` / ``attention_mask``): mean next-token negative
    log-likelihood over its tokens after the first (a one-token prompt: 0, nothing to predict)."""
    out = []
    was_training = model.training
    model.eval()
    device = model.device
    try:
        with model.using(*active), autocast(resolve_precision(precision, device), device), inference_linears(model):
            for b in batches:
                b = _right_padded(b, device)
                logits = model(**b).float()
                out.append((_entropy(logits) if logits.dim() == 2 else
                            _prompt_nll(logits, b["input_ids"], b["attention_mask"])).cpu())
    finally:
        model.train(was_training)
    result = torch.cat(out) if out else torch.zeros(0)
    # a NaN surprise is never the least and an example would go to whichever task came first
    refuse_non_finite(non_finite_rows(result.unsqueeze(1), minus_inf=False), f"the perplexity router's scores under {active[-1]!r}")
    return result


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    # entr(p) = -p log p, 0 where a probability underflows to 0, NaN where the logits are (refused after)
    entropy = torch.special.entr(logits.softmax(-1)).sum(-1)
    # a one-label head says nothing about an input: the most surprised, never the least
    return entropy / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else torch.ones_like(entropy)


def _prompt_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    counted = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)  # right-padded: a token and the one before it are real
    return (nll * counted).sum(1) / counted.sum(1).clamp(min=1)
