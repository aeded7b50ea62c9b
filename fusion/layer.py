"""AdapterFusion (Pfeiffer et al. 2021) over any layer-wise deltas, not only bottleneck adapters.

Stage 1 trains one delta per task (the stream does this). Stage 2, here: a new task whose only
delta is a fusion over frozen *source* tasks. At every module where a source's delta adds a term
(``h <- h + term``; LoRA at ``query``, an adapter at ``ffn_out``, a parallel adapter beside the
FFN, BitFit's bias), the fusion computes each source's term from the same ``x`` and ``h`` and adds
an attention-weighted mix of them instead::

    q = Q h                      (per token)
    k_n = K term_n,  v_n = V term_n          n = 1..N sources
    a = softmax_n(q . k_n / temperature)     (sources without a term at this module are masked)
    h <- h + sum_n a_n v_n

``V`` starts as the identity, so a fresh fusion adds the attention-weighted mean of the terms.
Only Q, K, V (and the new task's head) train; the sources stay frozen and are not copied: the
fusion calls their ``contribution`` directly. Sources that are not layer-wise (prompt and prefix
tuning change the input sequence or the attention, so they have no term to weigh) are refused.

    model.add_task("target", [FusionConfig(sources=("movie", "sms", "trec"))], label_names=[...])

The softmax temperature is a buffer: :meth:`AdapterFusion.on_train_step` (called by the training
loop) moves it along an optional linear schedule; an eval forward never changes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import nn

from adapters.base import Capabilities, Delta, IsActive, SiteDelta, hook_output, site_dims
from adapters.config import DeltaConfig
from adapters.errors import ConfigError
from adapters.registry import register
from adapters.targets import Site


@dataclasses.dataclass(frozen=True)
class FusionConfig(DeltaConfig):
    """sources:          the frozen tasks whose deltas are fused (order = attention columns)
    attn_dim:         width of the query/key projections (None: the module's width, as in the paper)
    temperature:      softmax temperature at the start of training
    temperature_end:  None keeps it constant; else it moves linearly to this value over
                      ``temperature_steps`` training steps (the paper anneals from high to 1)
    """

    method = "fusion"
    default_lr = 5e-4
    sources: tuple[str, ...] = ()
    attn_dim: int | None = None
    temperature: float = 1.0
    temperature_end: float | None = None
    temperature_steps: int = 1000

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("fusion: sources must name at least one task to fuse")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"fusion: sources repeat a task: {list(self.sources)}")
        if self.attn_dim is not None and self.attn_dim < 1:
            raise ConfigError(f"fusion: attn_dim must be >= 1, got {self.attn_dim}")
        if self.temperature <= 0 or (self.temperature_end is not None and self.temperature_end <= 0):
            raise ConfigError("fusion: temperatures must be > 0")
        if self.temperature_steps < 1:
            raise ConfigError(f"fusion: temperature_steps must be >= 1, got {self.temperature_steps}")


class FusionLayer(nn.Module):
    """Attention over the terms of N sources at one module, per token (see the module docstring)."""

    def __init__(self, d: int, attn_dim: int, present: list[bool]) -> None:
        super().__init__()
        self.query = nn.Linear(d, attn_dim)
        self.key = nn.Linear(d, attn_dim)
        self.value = nn.Linear(d, d, bias=False)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d))
        self.register_buffer("present", torch.tensor(present))

    def forward(self, h: torch.Tensor, terms: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, T, d); terms: (N, B, T, d). Returns the fused term (B, T, d) and the attention
        weights (B, T, N)."""
        dtype = self.query.weight.dtype
        q = self.query(h.to(dtype))
        k = self.key(terms.to(dtype))
        scores = torch.einsum("bta,nbta->btn", q, k) / temperature.to(q.dtype)
        scores = scores.masked_fill(~self.present, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(dtype)
        v = self.value(terms.to(dtype))
        return torch.einsum("btn,nbtd->btd", probs, v), probs


class Recorder:
    """Sums of attention weights per module, over the attended tokens of the batches seen.

    Set ``mask`` (B, T) before each forward pass; the fusion adds to it from its hooks."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}

    def add(self, module: str, probs: torch.Tensor) -> None:
        w = torch.ones(probs.shape[:2], device=probs.device) if self.mask is None else self.mask.to(probs.device).float()
        self.sums[module] = self.sums.get(module, 0) + torch.einsum("bt,btn->n", w, probs.float())
        self.tokens[module] = self.tokens.get(module, 0) + w.sum()

    def means(self) -> dict[str, torch.Tensor]:
        return {m: (self.sums[m] / self.tokens[m].clamp_min(1)).cpu() for m in self.sums}


@register
class AdapterFusion(Delta):
    """A fusion over the deltas of frozen source tasks. Built with :meth:`create` (it needs the
    model, to find the sources); see the module docstring."""

    config_class = FusionConfig
    # built over other tasks; a fresh fusion adds the mean of its sources' terms
    capabilities = Capabilities(
        identity_at_init=False, composite=True,
        why_not_mixed="a fusion's attention over its sources is computed per task, not stacked across tasks")

    @classmethod
    def create(cls, config: FusionConfig, model: Any) -> "AdapterFusion":
        sources = [model.task(name) for name in config.sources]  # unknown names: TaskError listing the known
        return cls(config, model.backbone, sources)

    def __init__(self, config: FusionConfig, backbone: nn.Module, sources: list[Any] | None = None) -> None:
        super().__init__(config, backbone)
        if sources is None:
            raise ConfigError("a fusion is built over a model's tasks: add it with model.add_task(name, "
                              "[FusionConfig(sources=...)]) or fusion.add_fusion")
        for task in sources:
            for d in task.deltas.values():
                if d.sources():  # a fusion, or anything else built over other tasks
                    raise ConfigError(f"cannot fuse task {task.name!r}: its {d.config.method} delta is built over "
                                      f"tasks {list(d.sources())}; fuse those tasks instead")
                if not d.capabilities.fusable:
                    raise ConfigError(
                        f"cannot fuse task {task.name!r}: its {d.config.method} delta is not layer-wise "
                        "(prompt and prefix tuning change the input sequence or the attention, so there is no "
                        "per-module term to weigh); fuse tasks trained with layer-wise methods (bottleneck, "
                        "parallel, lora, bitfit, compacter, ...)")
            if not task.deltas:
                raise ConfigError(f"cannot fuse task {task.name!r}: it has no delta (a head-only task)")
        # The sources' modules are not registered here (``_plan`` is a plain dict): their weights
        # belong to their own tasks (saved there, frozen there); the fusion only calls their
        # contribution functions.
        # module path -> for each source, its (delta, site) pairs at that module, in attach order
        plan: dict[str, list[list[tuple[SiteDelta, Site]]]] = {}
        dims: dict[str, int] = {}
        for n, task in enumerate(sources):
            for d in task.deltas.values():
                for site in d.sites:
                    _check_per_token(backbone, task.name, d, site)
                    plan.setdefault(site.output, [[] for _ in sources])[n].append((d, site))
                    dims[site.output] = site_dims(backbone, site)[1]
        self._plan = plan
        self.layers = nn.ModuleDict({
            _key(m): FusionLayer(dims[m], config.attn_dim or dims[m], [bool(e) for e in entries])
            for m, entries in plan.items()
        })
        self.register_buffer("temperature", torch.tensor(float(config.temperature)))
        self._captured: dict[str, torch.Tensor] = {}
        self._recorder: Recorder | None = None

    def sources(self) -> tuple[str, ...]:
        return tuple(self.config.sources)

    @property
    def modules_fused(self) -> list[str]:
        """Module paths where the fusion acts, in order."""
        return list(self._plan)

    def on_train_step(self, step: int, total: int) -> None:
        c = self.config
        if c.temperature_end is not None:
            frac = min(1.0, step / c.temperature_steps)
            self.temperature.fill_(c.temperature + frac * (c.temperature_end - c.temperature))

    def _hooks(self, backbone: nn.Module, is_active: IsActive) -> list:
        handles = []
        for module, entries in self._plan.items():
            inputs = [site.input for e in entries for _, site in e]
            handles += hook_output(backbone, module, inputs, is_active, self._term(module, entries), self._captured,
                                   prefix="fusion")
        return handles

    def _term(self, module: str, entries: list[list[tuple[SiteDelta, Site]]]):
        layer = self.layers[_key(module)]

        def term(xs: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
            terms = torch.stack([_source_term(e, xs, h) for e in entries])
            fused, probs = layer(h, terms, self.temperature)
            if self._recorder is not None:
                self._recorder.add(module, probs.detach())
            return fused

        return term

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recorder]:
        """Collect the attention weights of the forward passes run inside the block."""
        self._recorder = Recorder()
        try:
            yield self._recorder
        finally:
            self._recorder = None


def _source_term(entries: list[tuple[SiteDelta, Site]], xs: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """One source's total term at a module: its deltas there applied in order, each seeing the
    result of the previous one (exactly as when the source task runs alone)."""
    if not entries:
        return torch.zeros_like(h)
    total, cur = None, h
    for delta, site in entries:
        t = torch.broadcast_to(delta.contribution(site.key, xs[site.input], cur).to(h.dtype), h.shape)
        total = t if total is None else total + t
        cur = cur + t
    return total


def _check_per_token(backbone: nn.Module, task: str, delta: Delta, site: Site) -> None:
    """A fusion attends per token over hidden states: a site whose output is a table (MPNet's
    relative position bias, which a selective delta's default patterns reach) cannot be fused."""
    out = backbone.get_submodule(site.output)
    if isinstance(out, nn.Embedding) and out.embedding_dim != backbone.config.hidden_size:
        raise ConfigError(f"cannot fuse task {task!r}: its {delta.config.method} delta acts on {site.output}, a table "
                          "rather than per-token hidden states; exclude that module from the delta's patterns")


def _key(module: str) -> str:
    return module.replace(".", "__")  # ModuleDict keys cannot contain dots
