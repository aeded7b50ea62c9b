"""Mixed-task batches: one forward pass, each example through its own task's delta and head.

What a service answering many users needs ("in-batch parallel computing" in the Delta Tuning
survey): requests for different tasks share one batch and one pass through the frozen backbone.

    mixed = model.mixed(["movie", "sms", "trec"])            # a snapshot of those tasks' weights
    logits = mixed(input_ids, attention_mask, task_ids=["sms", "movie", "sms", "trec"])
    # logits[i, :n_labels(task_i)] are example i's logits; the padding columns are -inf

At every site, the tasks' site modules are stacked once (``SiteDelta.stack_sites``: LoRA and
bottleneck / parallel adapters gather each example's weights and run batched matrix products, with
no loop over tasks or examples). A method that cannot stack falls back to running each task's
examples through its own site module, one task at a time; the result is the same.

Prompt tuning stacks too (``Delta.stack_inputs``): each example gets its own task's prompt, laid
out so that its prompt and tokens keep the positions they have when the task runs alone.

The stacked weights are copies taken when the object is built: a task changed since (trained or
loaded) is refused when served, and the object must be built again.
Deltas that neither add a term at sites nor stack their inputs (prefix tuning, which changes the
attention; a fusion) are refused with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .base import FrozenRef, hook_site
from .errors import ConfigError, TaskError
from .heads import pool
from .inputs import check_positions, checked_batch


@dataclasses.dataclass
class MixedBatch:
    """What the site modules of one mixed forward pass read: each example's task slot."""

    idx: torch.Tensor
    _groups: list[tuple[int, torch.Tensor]] | None = None

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(task slot, row indices) of each task present; computed once per pass (one host sync,
        paid only when a site falls back to the per-task loop)."""
        if self._groups is None:
            slots = torch.unique(self.idx).tolist()
            self._groups = [(s, torch.nonzero(self.idx == s).squeeze(1)) for s in slots]
        return self._groups


class LoopSites(nn.Module):
    """Fallback for sites that cannot be stacked: each task's rows through its own delta, one task
    at a time. Holds the deltas' ``contribution`` functions, not their modules, so the live task
    weights are used and never copied or cast."""

    def __init__(self, terms: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]) -> None:
        super().__init__()
        self.terms = list(terms)

    def forward(self, x: torch.Tensor, h: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        out = None
        for slot, rows in batch.groups():
            if self.terms[slot] is None:
                continue
            part = h.index_select(0, rows)
            term = torch.broadcast_to(self.terms[slot](x.index_select(0, rows), part), part.shape)  # BitFit: a bias
            if out is None:
                out = term.new_zeros(h.shape)
            out.index_copy_(0, rows, term.to(out.dtype))
        return h.new_zeros(h.shape) if out is None else out


def _sites(delta: Any) -> list:
    """The sites of a delta that adds terms at sites; none for the others."""
    return list(delta.sites) if delta.capabilities.site_terms else []


class MixedTasks(nn.Module):
    """Serve a fixed set of tasks in mixed batches (see the module docstring).

    ``dtype``: the dtype the stacked weights are kept in (default: the backbone's).
    The hooks it places act only inside its own ``forward``; call :meth:`detach` to remove them."""

    def __init__(self, model: Any, tasks: Sequence[str], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(tasks, str):  # a string is a sequence too: of one-letter task names
            raise TaskError(f"give the tasks as a list of names, e.g. [{tasks!r}]")
        tasks = list(dict.fromkeys(tasks))
        if not tasks:
            raise TaskError("a mixed batch needs at least one task")
        # The model is not registered as a submodule: this object only adds stacked copies.
        self._model = FrozenRef(model)
        self.tasks = tuple(tasks)
        entries = [model.task(t) for t in tasks]
        for t in entries:
            if t.head is None:
                raise TaskError(f"task {t.name!r} has no head, so it has no logits to serve")
        kinds = {bool(getattr(t.head, "generative", False)) for t in entries}
        if len(kinds) > 1:
            raise TaskError("a mixed set holds either classification tasks or generative tasks, not both")
        self.generative = kinds == {True}
        for t in entries:  # by its declaration, before any hook is placed
            for d in t.deltas.values():
                if not d.capabilities.mixed_batches:
                    raise ConfigError(f"task {t.name!r} uses {d.config.method}, which cannot share a batch with "
                                      f"other tasks' examples: {d.capabilities.why_not_mixed}")
        groups = self._collect(entries)
        backbone = model.backbone
        dtype = dtype or next(backbone.parameters()).dtype
        self.stacked = nn.ModuleDict()
        self._captured: dict[str, torch.Tensor] = {}
        self._batch: MixedBatch | None = None
        self._handles = []
        for gid, ((dkey, _), (cls, site, sites)) in enumerate(groups.items()):
            module = (cls.stack_sites([None if s is None else s[0] for s in sites])
                      or LoopSites([None if s is None else s[1] for s in sites]))
            name = f"g{gid}_{dkey}_{site.key}"
            self.stacked[name] = module
            self._handles += hook_site(backbone, site, self._on, self._term(module, site.output), self._captured)
        self.inputs = nn.ModuleDict()  # input transforms (prompt tuning), stacked across tasks
        for dkey, (cls, deltas) in self._collect_inputs(entries).items():
            self.inputs[dkey] = cls.stack_inputs(deltas)
        if not self.generative:  # generative tasks share the backbone's own LM head
            self._stack_heads(entries)
        self.to(device=model.device)
        for buf_owner in [*self.stacked.values(), *self.inputs.values()]:
            buf_owner.to(dtype=dtype)
        # each task tensor the copies were taken from, with its version counter (bumped by every
        # in-place change: an optimizer step, a load): a task trained or loaded after this was
        # built would otherwise be served with its old weights, without a word
        self._copied = [(t.name, p, p._version) for t in entries for p in t.parameters()]

    # -- building --------------------------------------------------------------------------------
    @staticmethod
    def _collect(entries: list) -> dict[tuple[str, str], tuple[type, Any, list]]:
        """(delta key, site key) -> (method class, site, each task's (site module, term) or None), in an
        order that keeps every task's own order of deltas at a shared module."""
        groups: dict[tuple[str, str], tuple[type, Any, list]] = {}
        for i, t in enumerate(entries):
            for dkey, d in t.deltas.items():
                for site in _sites(d):
                    key = (dkey, site.key)
                    if key not in groups:
                        groups[key] = (type(d), site, [None] * len(entries))
                    elif groups[key][0] is not type(d):
                        raise ConfigError(f"tasks use {dkey!r} for different methods; give them distinct names")
                    # the site module to stack, and the delta's own term for the per-task fallback
                    groups[key][2][i] = (d.site_modules[site.key], partial(d.contribution, site.key))
        order = {k: n for n, k in enumerate(groups)}
        for t in entries:  # deltas at one module compose in order: every task must agree on it
            by_module: dict[str, list[int]] = {}
            for dkey, d in t.deltas.items():
                for site in _sites(d):
                    by_module.setdefault(site.output, []).append(order[(dkey, site.key)])
            for module, seq in by_module.items():
                if seq != sorted(seq):
                    raise ConfigError(
                        f"task {t.name!r} applies its deltas at {module} in another order than an earlier task; "
                        "tasks in one mixed batch must compose shared modules in the same order"
                    )
        return groups

    @staticmethod
    def _collect_inputs(entries: list) -> dict[str, tuple[type, list]]:
        """delta key -> (method class, each task's delta or None) for deltas that are not site deltas."""
        groups: dict[str, tuple[type, list]] = {}
        for i, t in enumerate(entries):
            for dkey, d in t.deltas.items():
                if d.capabilities.site_terms:
                    continue
                if dkey not in groups:
                    groups[dkey] = (type(d), [None] * len(entries))
                elif groups[dkey][0] is not type(d):
                    raise ConfigError(f"tasks use {dkey!r} for different methods; give them distinct names")
                groups[dkey][1][i] = d
        return groups

    def _stack_heads(self, entries: list) -> None:
        heads = [t.head for t in entries]
        d = heads[0].classifier.in_features
        c = max(h.num_labels for h in heads)
        W, b = torch.zeros(len(heads), d, c), torch.full((len(heads), c), float("-inf"))
        with torch.no_grad():
            for i, h in enumerate(heads):
                W[i, :, : h.num_labels] = h.classifier.weight.t().float()
                b[i, : h.num_labels] = h.classifier.bias.float()
        self.register_buffer("head_w", W)
        self.register_buffer("head_b", b)
        self.poolings = sorted({h.pooling for h in heads})
        self.register_buffer("pool_slot", torch.tensor([self.poolings.index(h.pooling) for h in heads]))

    def _on(self) -> bool:
        return self._batch is not None

    def _term(self, module: nn.Module, where: str):
        def term(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            if h.shape[0] != self._batch.idx.shape[0]:
                # e.g. MPNet's relative position bias: one table for the whole batch
                raise ConfigError(
                    f"{where} computes one output for the whole batch, not one per example, so a "
                    "delta there cannot differ between the examples of a mixed batch"
                )
            return module(x, h, self._batch)

        return term

    # -- using -------------------------------------------------------------------------------------
    def index(self, task_ids: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Task slots (positions in ``self.tasks``) for names or an index tensor, checked."""
        device = self._model().device
        if isinstance(task_ids, torch.Tensor):
            idx = task_ids.to(device=device, dtype=torch.long)
            # the range check reads the ids back (a host sync); compiled serving skips it
            if not torch.compiler.is_compiling() and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.tasks)):
                raise TaskError(f"task index out of range 0..{len(self.tasks) - 1}")
            return idx
        if isinstance(task_ids, str):
            raise TaskError(f"task_ids holds one task name per example, as a list; got the string {task_ids!r}")
        slot = {t: i for i, t in enumerate(self.tasks)}
        unknown = sorted({t for t in task_ids if t not in slot})
        if unknown:
            raise TaskError(f"tasks {unknown} are not in this mixed set {list(self.tasks)}")
        return torch.tensor([slot[t] for t in task_ids], device=device)

    @contextlib.contextmanager
    def serving(self, task_ids: Sequence[str] | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Within the block, every forward pass of the backbone runs example i through its own
        task's delta (the tasks' own hooks are off); yields the task slots. Generation runs its
        prefill and every decoding step inside one such block."""
        if not torch.compiler.is_compiling():
            changed = sorted({name for name, p, version in self._copied if p._version != version})
            if changed:
                raise TaskError(f"tasks {changed} changed (trained or loaded) after this mixed set was built: it holds "
                                "copies of their old weights; build it again with model.mixed(...)")
        idx = self.index(task_ids)
        if idx.shape[0] != batch_size:
            raise ValueError(f"{batch_size} examples but {idx.shape[0]} task ids")
        self._batch = MixedBatch(idx)
        try:
            with self._model().disabled():
                yield idx
        finally:
            self._batch = None
            self._captured.clear()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: Sequence[str] | torch.Tensor = (),
        **extra: Any,
    ) -> torch.Tensor:
        """Logits (batch, most labels of any task); columns past a task's labels are -inf."""
        if self.generative:
            raise TaskError("these tasks are generative: use adapters.generation.generate(..., mixed=this) instead")
        attention_mask = checked_batch(input_ids, attention_mask)
        with self.serving(task_ids, input_ids.shape[0]) as idx:
            hidden = self._encode(input_ids, attention_mask, extra)
        pooled = pool(hidden, attention_mask, self.poolings[0])
        for k, how in enumerate(self.poolings[1:], start=1):
            pooled = torch.where((self.pool_slot[idx] == k)[:, None], pool(hidden, attention_mask, how), pooled)
        pooled = pooled.to(self.head_w.dtype)
        return torch.bmm(pooled.unsqueeze(1), self.head_w[idx]).squeeze(1) + self.head_b[idx]

    def transform_inputs(
        self, input_ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]
    ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, Any], torch.Tensor]:
        """Inside :meth:`serving`: each example's own input transform (its task's prompt). Gives
        (embeddings, or None when no task transforms its input; mask; extra; per-example offset
        of the first input token)."""
        offset = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        if not len(self.inputs):
            return None, mask, extra, offset
        embeds = self._model().backbone.get_input_embeddings()(input_ids)
        for module in self.inputs.values():
            embeds, mask, extra, added = module(embeds, mask, extra, self._batch)
            offset = offset + added
        return embeds, mask, extra, offset

    def _encode(self, input_ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        model = self._model()
        backbone = model.backbone
        extra = {k: v for k, v in extra.items() if v is not None}
        embeds, full_mask, extra, offset = self.transform_inputs(input_ids, mask, extra)
        check_positions(model, input_ids.shape[1], full_mask.shape[1] - input_ids.shape[1])
        if embeds is None:
            return backbone(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        hidden = backbone(inputs_embeds=embeds, attention_mask=full_mask, **extra).last_hidden_state
        # each example's own tokens start after its own prompt
        at = offset.unsqueeze(1) + torch.arange(input_ids.shape[1], device=offset.device)
        return torch.gather(hidden, 1, at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def detach(self) -> None:
        """Remove the hooks from the backbone (the tasks themselves are untouched)."""
        for h in self._handles:
            h.remove()
        self._handles = []
