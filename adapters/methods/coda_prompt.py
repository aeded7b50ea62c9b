"""A prompt assembled per input from a pool of components by learned keys and attention (CODA-Prompt).

CODA-Prompt, Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning" (CVPR 2023). The pool holds M components P_m (each L_p soft
tokens), each with a key K_m and an attention vector A_m in the backbone's hidden space. For an
input x with query q(x) (the frozen backbone's representation of x without any prompt), every
component gets a weight

    α_m = cos(q(x) ⊙ A_m, K_m)

and the input's prompt is their weighted sum, ``p(x) = Σ_m α_m P_m``, prepended to x's embeddings.
Unlike L2P (``prompt_pool``) nothing is selected: the weights are differentiable, so keys,
attention and components all learn from the task's loss alone. The pool is split among the
stream's tasks: task t trains its own M / T components (and their keys and attention), which start
orthogonal (Gram-Schmidt) to every earlier task's, while the earlier tasks' stay fixed; the
``coda-prompt`` strategy (:mod:`continual.strategies.coda_prompt`) calls :meth:`CodaPrompt.begin_task`
and holds the rest. No task id is needed at test time.

Paper defaults (ViT-B/16, 10 tasks): M = 100, L_p = 8, T = 10 (10 components a task). Ours: the same
(``pool_size=100, prompt_length=8, tasks=10``); the query is the mean of the backbone's (for T5: its
encoder's) last hidden states over the real tokens (the paper takes ViT's [CLS]), as for L2P.

How we depart from the paper: the prompt is prepended to the input embeddings (prompt tuning) where
the paper prefixes keys and values in layers 1-5 (prefix tuning); a task's components are set up
when the task starts (the first task's when the pool is made) and every component not yet set up is zero, so it adds nothing (α_m = 0,
P_m = 0) and the module is stateless (a checkpoint holds everything it needs). Components are
scaled, after Gram-Schmidt, so that their token rows have the embedding table's mean row norm (the
paper's are unit vectors at ViT's scale). The pool has at most as many components as the hidden
size (keys and attention vectors must start orthogonal); more is refused. Decoder-only backbones
are refused, as for L2P (a training input holds its answer, a generated one does not).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Capabilities, FrozenRef
from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import register
from .prompt import prepend
from .prompt_pool import QueryDelta


@dataclasses.dataclass(frozen=True)
class CodaPromptConfig(DeltaConfig):
    method = "coda_prompt"
    default_lr = 1e-2
    pool_size: int = 100
    prompt_length: int = 8
    tasks: int = 10

    def validate(self) -> None:
        self.require_positive("pool_size", "prompt_length", "tasks")
        if self.pool_size % self.tasks:
            raise ConfigError(f"pool_size ({self.pool_size}) must be a multiple of tasks ({self.tasks}): each task gets "
                              "pool_size / tasks components")

    @property
    def per_task(self) -> int:
        return self.pool_size // self.tasks


def orthogonal_rows(earlier: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` orthonormal rows orthogonal to the span of ``earlier`` (n, D) (Gram-Schmidt, as a
    QR: the paper's initialisation of a new task's components); needs n + k <= D."""
    x = torch.randn(k, earlier.shape[1], dtype=torch.float64)
    if earlier.shape[0]:
        basis = torch.linalg.qr(earlier.double().t()).Q  # (D, n)
        x = x - (x @ basis) @ basis.t()
    return torch.linalg.qr(x.t()).Q.t().float()


@register
class CodaPrompt(QueryDelta):
    config_class = CodaPromptConfig
    capabilities = Capabilities(identity_at_init=False, input_transform=True, decoders=False,
                                why_not_mixed="each example already weighs its own components, with a second backbone pass")

    @classmethod
    def positions_added(cls, config: CodaPromptConfig) -> int:
        return config.prompt_length

    def __init__(self, config: CodaPromptConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        table = backbone.get_input_embeddings().weight
        d = table.shape[1]
        if config.pool_size > d:
            raise ConfigError(f"coda_prompt: pool_size {config.pool_size} exceeds the hidden size {d}; its keys and "
                              f"attention vectors start orthogonal, so at most {d} components (e.g. pool_size="
                              f"{d - d % config.tasks},tasks={config.tasks})")
        self.row_norm = float(table.detach().float().norm(dim=1).mean())
        n, L = config.per_task, config.prompt_length
        # one chunk per task (so a strategy can hold the others by name); zero until begin_task
        self.components = nn.ParameterList([nn.Parameter(torch.zeros(n, L, d)) for _ in range(config.tasks)])
        self.keys = nn.ParameterList([nn.Parameter(torch.zeros(n, d)) for _ in range(config.tasks)])
        self.attention = nn.ParameterList([nn.Parameter(torch.zeros(n, d)) for _ in range(config.tasks)])
        self.begin_task(0)  # so that the first task (and any strategy that never calls begin_task) trains
        self._model: FrozenRef | None = None  # set by create()
        self.weights: torch.Tensor | None = None  # the last forward pass's α (B, M)

    def task_names(self, t: int) -> list[str]:
        """Task ``t``'s parameters, by name within this module."""
        return [f"{kind}.{t}" for kind in ("components", "keys", "attention")]

    @torch.no_grad()
    def begin_task(self, t: int) -> None:
        """Set up task ``t``'s components, keys and attention vectors orthogonal to tasks 0..t-1's
        (components flattened to L_p·d); components at the embeddings' scale (module docstring)."""
        if not 0 <= t < self.config.tasks:
            raise ConfigError(f"coda_prompt has components for {self.config.tasks} tasks (tasks={self.config.tasks}); "
                              f"task {t + 1} has none: give coda_prompt:tasks=N for an N-task stream")
        n, L = self.config.per_task, self.config.prompt_length
        for kind in ("components", "keys", "attention"):
            chunks = getattr(self, kind)
            earlier = torch.cat([c.detach().float().cpu().reshape(n, -1) for c in list(chunks)[:t]]) if t else \
                torch.zeros(0, chunks[t][0].numel())
            rows = orthogonal_rows(earlier, n)
            if kind == "components":
                rows = rows * (self.row_norm * L ** 0.5)  # each token row at the embeddings' mean norm
            chunks[t].copy_(rows.reshape(chunks[t].shape))

    def mix(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, every component's weight α (B, M) and the prompt Σ α_m P_m (B, L_p, d)."""
        keys, attention = torch.cat(list(self.keys)).float(), torch.cat(list(self.attention)).float()
        components = torch.cat(list(self.components)).float()
        aq = F.normalize(query.float().unsqueeze(1) * attention.unsqueeze(0), dim=-1)  # (B, M, d)
        alpha = (aq * F.normalize(keys, dim=-1).unsqueeze(0)).sum(-1)  # a zero key or attention: α = 0
        return alpha, torch.einsum("bm,mld->bld", alpha, components)

    def transform_inputs(self, embeds, mask, extra):
        alpha, prompt = self.mix(self.query(embeds, mask, extra))
        self.weights = alpha
        return prepend(prompt, embeds, mask, extra)
