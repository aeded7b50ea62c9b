"""Text generation through task deltas: greedy (or top-k sampled) decoding with a KV cache, one task or a mixed batch.

    model = DeltaModel.from_pretrained("smollm2")                 # a decoder, with its LM head
    model.add_task("sentiment", "lora", generative=True)
    model.activate("sentiment")
    new_tokens = generate(model, input_ids, attention_mask, max_new_tokens=8)

    mixed = model.mixed(["sentiment", "topic"])                    # many tasks in one batch
    new_tokens = generate(model, input_ids, attention_mask, mixed=mixed, task_ids=["topic", "sentiment"])

Why not ``transformers``' ``generate``: prompt tuning prepends soft tokens to the *input
embeddings* at the first step only, and a mixed batch needs each example's own task through the
prefill and every decoding step. This loop owns both:

- prefill: the active input transforms (prompt tuning; per example in a mixed batch) run once,
  then the whole prompt goes through the backbone, filling the KV cache; later steps feed one new
  token per example, and the transform is never applied again (the soft tokens are in the cache);
- positions come from the attention mask (``cumsum - 1``), so left padding, right padding and
  prepended soft tokens all give each real token the position it has when the example runs
  alone; the next-token logits are read at each example's last real position;
- prefix tuning needs nothing here: its keys and values are prepended inside the attention at
  every call, cached positions or not (see :mod:`adapters.methods.prefix`).

``use_cache=False`` recomputes the whole sequence at every step (slow); the tests use it as the
reference the cached path must equal.

Speed: decoding a few rows a step is bound by reading the weights. :func:`answer_batches` (and
so ``continual``'s scoring) runs inside :func:`adapters.precision.inference_linears`, which holds
the frozen weights once in the pass's dtype (prepacked on a CPU); a caller of :func:`generate` in
a loop enters it once around the loop (``benchmarks/decode_speed.py`` measures the difference).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Sequence

import torch

from .errors import NonFiniteError, TaskError, refuse_non_finite
from .inputs import check_positions, checked_batch
from .precision import inference_linears


def _check_generative(model: Any, tasks: Sequence[str]) -> None:
    if model.lm_head is None:
        raise TaskError(f"backbone {model.backbone_name!r} has no language-model head: generation needs a decoder "
                        "loaded with its LM head (DeltaModel.from_pretrained loads decoders that way)")
    bad = [t for t in tasks if not getattr(model.task(t).head, "generative", False)]
    if bad:
        raise TaskError(f"tasks {bad} are not generative (add them with generative=True)")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position (any padding side)."""
    at = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (at * mask.long()).argmax(dim=1)


class _Inputs:
    """The input transforms of one generation: the model's active ones, or a mixed set's."""

    def __init__(self, model: Any, mixed: Any) -> None:
        self.model, self.mixed = model, mixed

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.mixed if self.mixed is not None else self.model
        embeds, mask, _, _ = source.transform_inputs(ids, mask, {})
        if embeds is None:
            embeds = self.model.backbone.get_input_embeddings()(ids)
        return embeds, mask


def _cache_kw(module: Any) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` (5.2x); take whichever this one has
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class _Causal:
    """Next-token logits of a decoder-only model: prefill once, then one token per step."""

    def __init__(self, model: Any, inputs: _Inputs, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool,
                 max_new: int = 1) -> None:
        from transformers import DynamicCache

        self.model, self.inputs, self.max_new = model, inputs, max_new
        self.rows = torch.arange(ids.shape[0], device=ids.device)
        self.ids, self.mask = ids, mask
        self.cache = DynamicCache(config=model.backbone.config) if use_cache else None
        self.kw = _cache_kw(model.backbone)

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.model.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  use_cache=cache is not None, **{self.kw: cache})
        return out.last_hidden_state

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        return head(last.to(head.weight.dtype)).float()

    def first(self) -> torch.Tensor:
        embeds, self.full = self.inputs(self.ids, self.mask)
        # before any decoding: a table of absolute positions (GPT-2's) overflowed at step N, cryptically
        check_positions(self.model, self.ids.shape[1], self.full.shape[1] - self.ids.shape[1], self.max_new - 1)
        hidden = self._run(embeds, self.full, _positions(self.full), self.cache)
        return self._logits(hidden[self.rows, _last_real(self.full)])

    def next(self, token: torch.Tensor) -> torch.Tensor:
        ones = self.mask.new_ones(token.shape[0], 1)
        if self.cache is not None:
            self.full = torch.cat([self.full, ones], dim=1)
            step_pos = self.full.long().sum(1, keepdim=True) - 1  # the new token's position: real tokens before it
            emb = self.model.backbone.get_input_embeddings()(token.unsqueeze(1))
            return self._logits(self._run(emb, self.full, step_pos, self.cache)[:, -1])
        # the reference path: everything again, transforms included
        self.ids = torch.cat([self.ids, token.unsqueeze(1)], dim=1)
        self.mask = torch.cat([self.mask, ones], dim=1)
        embeds, full = self.inputs(self.ids, self.mask)
        hidden = self._run(embeds, full, _positions(full), None)
        return self._logits(hidden[self.rows, _last_real(full)])  # a mixed prompt layout pads at the end


class _Seq2Seq:
    """Next-token logits of an encoder-decoder: the encoder runs once (input transforms act on its
    input), the decoder starts from its start token and reads its own cache."""

    def __init__(self, model: Any, inputs: _Inputs, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool) -> None:
        self.model, self.inputs, self.ids, self.mask, self.use_cache = model, inputs, ids, mask, use_cache
        self.kw = _cache_kw(model.backbone)
        self.cache = None

    def _run(self, decoder_ids: torch.Tensor) -> torch.Tensor:
        out = self.model.backbone(encoder_outputs=self.encoded, attention_mask=self.full, decoder_input_ids=decoder_ids,
                                  use_cache=self.use_cache, **({self.kw: self.cache} if self.cache is not None else {}))
        if self.use_cache:
            self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float()

    def first(self) -> torch.Tensor:
        embeds, self.full = self.inputs(self.ids, self.mask)
        self.encoded = self.model.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=self.full)
        start = self.model.decoder_start_id
        self.decoded = torch.full((self.ids.shape[0], 1), start, dtype=torch.long, device=self.ids.device)
        return self._run(self.decoded)

    def next(self, token: torch.Tensor) -> torch.Tensor:
        self.decoded = torch.cat([self.decoded, token.unsqueeze(1)], dim=1)
        return self._run(self.decoded[:, -1:] if self.use_cache else self.decoded)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    mixed: Any = None,
    task_ids: Sequence[str] | torch.Tensor | None = None,
    use_cache: bool = True,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt: the new token ids of each example, up to (not
    including) its end-of-sequence token. With ``top_k``, each token is instead sampled from the
    ``top_k`` most likely ones (renormalised; temperature 1), drawn with ``generator`` (on the
    model's device; seeded by the caller, so a run repeats its samples) — what a language model's
    pseudo-examples are drawn with (LAMOL's top-k sampling).

    Without ``mixed`` the model's active tasks act (the last one generative). With ``mixed`` (a
    :class:`~adapters.mixed.MixedTasks` of generative tasks) example i goes through the delta of
    ``task_ids[i]``. ``eos_token_id`` defaults to the tokenizer's."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None (greedy) or an integer >= 1, got {top_k!r}")
    attention_mask = checked_batch(input_ids, attention_mask)
    empty = torch.nonzero(attention_mask.sum(-1) == 0).flatten().tolist()
    if empty:  # nothing to continue from: the row would decode from padding alone
        raise ValueError(f"prompts {empty} of the batch have no token (their attention mask is all zeros)")
    tok = model.tokenizer
    if eos_token_id is None and tok is not None:
        eos_token_id = tok.eos_token_id
    eos = torch.tensor([] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       device=input_ids.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (getattr(tok, "pad_token_id", None) or 0)
    if mixed is not None:
        if task_ids is None:
            raise ValueError("a mixed generation needs task_ids (one task per example)")
        if not mixed.generative:
            raise TaskError("this mixed set serves classification tasks; generation needs generative tasks")
        context = mixed.serving(task_ids, input_ids.shape[0])
    else:
        if not model.active_tasks:
            raise TaskError("no task selected: call model.activate(task) first (or pass mixed=...)")
        _check_generative(model, model.active_tasks[-1:])
        context = contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with context:
            inputs = _Inputs(model, mixed)
            stepper = (_Seq2Seq(model, inputs, input_ids, attention_mask, use_cache) if model.seq2seq else
                       _Causal(model, inputs, input_ids, attention_mask, use_cache, max_new_tokens))
            pick = _greatest if top_k is None else _top_k_sampler(top_k, generator)
            new = _greedy(stepper, input_ids.shape[0], max_new_tokens, eos, pad, pick)
    finally:
        model.train(was_training)
    return new


def _greatest(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # one reduction gives the token (the first maximum, as argmax) and its value: a row's max is
    # NaN if the row holds a NaN, +inf if it holds +inf; -inf (a masked token) passes
    return logits.max(-1)


def _top_k_sampler(k: int, generator: torch.Generator | None):
    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, _ = logits.max(-1)  # (the non-finite check reads it, as for greedy)
        values, tokens = logits.topk(min(k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(values.float(), dim=-1)
        # a row that is not finite gets a valid draw here (multinomial refuses NaN); decoding then
        # refuses it by its max, as greedy decoding does
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, torch.ones_like(probs))
        choice = torch.multinomial(probs, 1, generator=generator)
        return top, tokens.gather(-1, choice).squeeze(-1)
    return pick


def _greedy(stepper: Any, b: int, max_new: int, eos: torch.Tensor, pad: int, pick=_greatest) -> list[list[int]]:
    """Decoding (greedy, or as ``pick`` chooses each step's tokens): each row's new tokens up to its
    end-of-sequence token (not included)."""
    device = eos.device
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = torch.full((b, max_new), pad, dtype=torch.long, device=device)
    lengths = torch.full((b,), max_new, dtype=torch.long, device=device)
    bad = torch.zeros(b, dtype=torch.bool, device=device)  # rows whose logits held NaN / +inf (read once, at the end)
    logits = stepper.first()
    for i in range(max_new):
        top, best = pick(logits)
        bad |= ~(top < float("inf")) & ~done
        token = torch.where(done, torch.full((b,), pad, dtype=torch.long, device=device), best)
        out[:, i] = token
        ended = torch.isin(token, eos) & ~done
        lengths = torch.where(ended, torch.full_like(lengths, i), lengths)
        done = done | ended
        if i + 1 == max_new or bool(done.all()):
            break
        logits = stepper.next(token)
    refuse_non_finite(bad.sum(), "greedy decoding")
    return [out[r, : int(lengths[r])].tolist() for r in range(b)]


def answer_batches(model: Any, batches: Iterable[dict[str, Any]], max_new_tokens: int, mixed: Any = None,
                   task_ids: torch.Tensor | Sequence[str] | None = None) -> list[str]:
    """Decoded greedy answers (special tokens removed, stripped) to tokenised prompt batches
    (``input_ids`` / ``attention_mask``, left-padded), in order. With ``mixed``, ``task_ids`` holds
    one task per example across all batches."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("answers need a model with a tokenizer, to decode them")
    out: list[str] = []
    failed = 0  # examples whose outputs were not finite: every batch is still answered (processes that
    # generate together run the same number of forward passes), and the error comes after the last
    with inference_linears(model):  # the frozen weights copied (and packed) once for all the batches
        for b in batches:
            n = b["input_ids"].shape[0]
            ids = None if mixed is None else task_ids[len(out):len(out) + n]
            try:
                new = generate(model, b["input_ids"].to(model.device), b["attention_mask"].to(model.device),
                               max_new_tokens=max_new_tokens, mixed=mixed, task_ids=ids)
            except NonFiniteError as e:
                failed += e.count if e.count is not None else n
                new = [[] for _ in range(n)]
            out += [tok.decode(t, skip_special_tokens=True).strip() for t in new]
    refuse_non_finite(failed, "greedy decoding")
    return out


def generate_text(model: Any, prompts: Sequence[str], max_new_tokens: int = 16, **kwargs: Any) -> list[str]:
    """Decoded greedy answers to ``prompts`` (left-padded in one batch), special tokens removed."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("generate_text needs a model with a tokenizer")
    if isinstance(prompts, str):  # a string is a sequence too: of one-character prompts
        raise TypeError("generate_text takes a list of prompts; for one prompt pass [prompt]")
    if not prompts:
        return []
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:  # else the tokenizer's TypeError, or "input_ids of shape (1, 0)" for a batch the caller never saw
        raise ValueError(f"prompts {bad} are not text to continue (each prompt must be a non-empty string); "
                         f"got {[prompts[i] for i in bad][:3]!r}")
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return answer_batches(model, [enc], max_new_tokens, **kwargs)
