"""A LoRA per task, mixed per input by attention over learned task keys (SAPT's shared attentive learning).

SAPT, Zhao, Wang, Hu, Zhao, Qin, Zhang, Yang, Xu and Che, "SAPT: A Shared Attentive Framework for
Parameter-Efficient Continual Learning of Large Language Models" (ACL 2024, arXiv:2401.08295). Its
*shared attentive learning and selection* module keeps one parameter-efficient block per task and,
for every input, a weight for each: with e_1..e_T the input's token embeddings (the frozen
embedding table's rows, before the first layer) and d the hidden size,

    q(x) = LayerNorm(SiLU(W_2 W_1 max_t e_t))           W_1: d -> query_dim, W_2: query_dim -> d
    α_i(x) = softmax_i(k_i · q(x) / √d)                 over the tasks begun so far, one key k_i each

and at every site the delta adds ``Σ_i α_i(x) · s · B_i A_i x`` (LoRA's term, ``s = alpha / rank``,
weighted per input). The weights are differentiable, so the new task's LoRA, its key and the query
map all learn from the task's loss; nothing needs a task id at test time. The ``sapt`` strategy
(:mod:`continual.strategies.sapt`) begins each task's slot (:meth:`SaptLoRA.begin_task`), holds the
earlier tasks' LoRAs and keys fixed, and adds the paper's attentive reflection (a loss that keeps
earlier tasks' inputs attending as they did).

Defaults: LoRA's (rank 8, alpha 16, query and value, the library's LoRA defaults, so tables compare
with ``lora`` under other strategies; the paper's scripts use rank 4, alpha 32), ``query_dim=100``
(the released code's width) and ``tasks=10`` slots.

How we depart from the paper: the max over tokens skips padding (the released code takes it over
every position); keys start uniform in [-1, 1] when their task begins, as in the released code,
and every slot not yet begun has a zero key and is left out of the softmax, so the module is
stateless (a checkpoint holds everything it needs). Decoder-only backbones are refused, as for
L2P (``prompt_pool``): a decoder's training input holds its answer and a generated one does not,
so the max over tokens, and the mixture, would differ between training and generation (the
paper's T5 runs take the encoder's input; T5 and encoders are served here). An input's weights
hold for every pass over it, T5's decoder steps included (the released code passes the encoder's
weights to the decoder's LoRAs too).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..base import Capabilities, SiteDelta
from ..errors import ConfigError
from ..precision import lowrank_precision
from ..registry import register
from ..targets import Site
from .lora import LoRAConfig, check_low_rank_site


@dataclasses.dataclass(frozen=True)
class SaptLoRAConfig(LoRAConfig):
    """LoRA's fields and checks (each task's LoRA is one), the query map's width and the slots."""

    method = "sapt_lora"
    query_dim: int = 100
    tasks: int = 10

    def validate(self) -> None:
        super().validate()
        self.require_positive("query_dim", "tasks")


class SlotLoRASite(nn.Module):
    """One site's LoRA per task slot; the term is their sum weighted per input by ``alpha`` (B, slots)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, dropout: float, tasks: int) -> None:
        super().__init__()
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, d_in)) for _ in range(tasks)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, rank)) for _ in range(tasks)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, alpha: torch.Tensor, used: list[int]) -> torch.Tensor:
        with lowrank_precision(x):
            x = self.dropout(x.to(self.lora_A[0].dtype))
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one weight per input, over its tokens
            terms = [alpha[:, i].to(x.dtype).reshape(shape) * ((x @ self.lora_A[i].t()) @ self.lora_B[i].t()) for i in used]
            return torch.stack(terms).sum(0) * self.scaling


@register
class SaptLoRA(SiteDelta):
    config_class = SaptLoRAConfig
    capabilities = Capabilities(site_terms=True, input_transform=True, decoders=False,
                                why_not_mixed="each example already weighs every task's LoRA by its own attention")

    def __init__(self, config: SaptLoRAConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        d = backbone.get_input_embeddings().weight.shape[1]
        self.query = nn.Sequential(nn.Linear(d, config.query_dim, bias=False), nn.Linear(config.query_dim, d, bias=False),
                                   nn.SiLU(), nn.LayerNorm(d))
        self.keys = nn.ParameterList([nn.Parameter(torch.zeros(d)) for _ in range(config.tasks)])
        self.begin_task(0)  # so that the first task (and any strategy that never calls begin_task) trains
        self.alpha: torch.Tensor | None = None  # the last input's weights (B, slots), read by every site
        self._used: list[int] = []  # and the slots they cover (read once per input, not at every site)

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        c = self.config
        check_low_rank_site(c, site, d_in, d_out, backbone)
        return SlotLoRASite(d_in, d_out, c.rank, c.alpha / c.rank, c.dropout, c.tasks)

    def task_names(self, t: int) -> list[str]:
        """Task slot ``t``'s parameters, by name within this module: its LoRA at every site and its key."""
        return [f"site_modules.{k}.lora_{m}.{t}" for k in self.site_modules for m in "AB"] + [f"keys.{t}"]

    def shared_names(self) -> list[str]:
        """The query map's parameters: every task trains them."""
        return [f"query.{n}" for n, _ in self.query.named_parameters()]

    @torch.no_grad()
    def begin_task(self, t: int) -> None:
        """Begin task slot ``t``: its key uniform in [-1, 1] (the released code's), so it joins the softmax."""
        if not 0 <= t < self.config.tasks:
            raise ConfigError(f"sapt_lora has LoRAs for {self.config.tasks} tasks (tasks={self.config.tasks}); "
                              f"task {t + 1} has none: give sapt_lora:tasks=N for an N-task stream")
        self.keys[t].uniform_(-1, 1)

    def used(self) -> list[int]:
        """The slots begun so far (a non-zero key)."""
        begun = torch.stack([k.detach() for k in self.keys]).ne(0).any(1)
        return begun.nonzero().flatten().tolist()  # one read from the device, not one per slot

    def scores(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Per input, the attention logits k_i · q(x) / √d over the begun slots (B, n), and those slots."""
        used = self.used()
        real = mask.bool().unsqueeze(-1)
        pooled = embeds.float().masked_fill(~real, float("-inf")).amax(1)
        pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))  # a row without real tokens
        q = self.query(pooled.to(self.query[0].weight.dtype)).float()
        keys = torch.stack([self.keys[i] for i in used]).float()
        return q @ keys.t() / math.sqrt(q.shape[-1]), used

    def transform_inputs(self, embeds, mask, extra):
        logits, used = self.scores(embeds, mask)
        alpha = logits.new_zeros(logits.shape[0], self.config.tasks)
        alpha[:, used] = torch.softmax(logits, dim=-1)
        self.alpha, self._used = alpha, used
        return embeds, mask, extra, 0

    def contribution(self, key: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        if alpha is None or alpha.shape[0] != x.shape[0]:  # a pass that did not run the input transforms first
            raise RuntimeError("sapt_lora's weights come from the input's embeddings: run the model through "
                               "DeltaModel (its forward, encode or generate), which computes them first")
        return self.site_modules[key](x, alpha, self._used)
