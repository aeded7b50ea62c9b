"""A prompt shared by every task beside one expert prompt per task, chosen by a key (DualPrompt).

DualPrompt, Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning" (ECCV 2022). Two kinds of prompt: one G(eneral)-prompt g (L_g soft tokens) that every
task trains, for what the tasks share, and one E(xpert)-prompt e_t (L_e tokens) per task with a key
k_t in the backbone's hidden space, for what is the task's own. Training on task t uses e_t (the
task is known while training) and pulls its key toward the task's inputs' queries with the
matching loss ``λ · (1 − cos(q(x), k_t))`` (the strategy adds it: ``dual-prompt``,
:mod:`continual.strategies.dual_prompt`, reading :attr:`DualPrompt.pull`). At test time nothing
names the task: the input's query q(x) (the frozen backbone's representation of x without any
prompt) picks the expert prompt whose key is most similar (cosine), and ``[g; e; x]`` runs.

Paper defaults (ViT-B/16, 10 tasks): L_g = 5, L_e = 5, one expert prompt per task, λ = 1. Ours: the
same (``g_length=5, e_length=5, tasks=10``; the strategy's ``pull_lambda=1.0``); the query is the
mean of the backbone's (for T5: its encoder's) last hidden states over the real tokens, as for L2P.

How we depart from the paper: both prompts are prepended to the input embeddings (prompt tuning),
where the paper prefixes keys and values, g in layers 1-2 and e in layers 3-5 (prefix tuning).
Prompts start as random vocabulary embeddings (as ``prompt``), a key uniform in [-1, 1] when its
task starts (the first task's when the module is made); a key not yet set up is zero and never
chosen. A forward pass with gradients (a training step) uses the task's expert prompt; one
without (every score, dev scores during training too) lets the query choose, as at test time. Decoder-only backbones are refused, as for
L2P (a training input holds its answer, a generated one does not).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Capabilities, FrozenRef
from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import register
from .prompt import initial_tokens, prepend
from .prompt_pool import QueryDelta


@dataclasses.dataclass(frozen=True)
class DualPromptConfig(DeltaConfig):
    method = "dual_prompt"
    default_lr = 3e-2
    g_length: int = 5
    e_length: int = 5
    tasks: int = 10
    init: Literal["vocab", "random"] = "vocab"

    def validate(self) -> None:
        self.require_positive("g_length", "e_length", "tasks")


@register
class DualPrompt(QueryDelta):
    config_class = DualPromptConfig
    capabilities = Capabilities(identity_at_init=False, input_transform=True, decoders=False,
                                why_not_mixed="each example already chooses its own expert prompt, with a second backbone pass")

    @classmethod
    def positions_added(cls, config: DualPromptConfig) -> int:
        return config.g_length + config.e_length

    def __init__(self, config: DualPromptConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        table = backbone.get_input_embeddings().weight
        self.general = nn.Parameter(initial_tokens(table, config.g_length, config.init))
        self.expert = nn.ParameterList([nn.Parameter(initial_tokens(table, config.e_length, config.init))
                                        for _ in range(config.tasks)])
        self.keys = nn.ParameterList([nn.Parameter(torch.zeros(table.shape[1])) for _ in range(config.tasks)])
        self.task: int | None = None  # the expert prompt training steps use (set by begin_task)
        self.begin_task(0)  # so that the first task (and any strategy that never calls begin_task) has a key
        self._model: FrozenRef | None = None  # set by create()
        self.pull: torch.Tensor | None = None  # the last training pass's mean 1 − cos(q, k_task)
        self.selected: torch.Tensor | None = None  # the last pass's expert prompt per example (B,)

    def task_names(self, t: int) -> list[str]:
        """Task ``t``'s own parameters (its expert prompt and key), by name within this module."""
        return [f"expert.{t}", f"keys.{t}"]

    @torch.no_grad()
    def begin_task(self, t: int) -> None:
        """Give task ``t`` its key (uniform in [-1, 1], as L2P's) and make its expert prompt the one
        training steps use."""
        if not 0 <= t < self.config.tasks:
            raise ConfigError(f"dual_prompt has expert prompts for {self.config.tasks} tasks (tasks={self.config.tasks}); "
                              f"task {t + 1} has none: give dual_prompt:tasks=N for an N-task stream")
        self.keys[t].copy_(torch.rand(self.keys[t].shape) * 2 - 1)
        self.task = t

    def choose(self, query: torch.Tensor) -> torch.Tensor:
        """Per example, the set-up key most similar (cosine) to its query; ties to the lower index."""
        keys = torch.stack(list(self.keys)).float()
        sim = F.normalize(query.float(), dim=-1) @ F.normalize(keys, dim=-1).t()
        sim = sim.masked_fill(~keys.any(dim=1), float("-inf"))  # a key not yet set up is never chosen
        return sim.argmax(dim=1)

    def transform_inputs(self, embeds, mask, extra):
        q = self.query(embeds, mask, extra)
        if torch.is_grad_enabled() and self.task is not None:  # a training step: the task's own prompt, its key pulled
            idx = torch.full((q.shape[0],), self.task, dtype=torch.long, device=q.device)
            self.pull = (1 - F.cosine_similarity(q.float(), self.keys[self.task].float().unsqueeze(0), dim=-1)).mean()
        else:
            idx = self.choose(q)
        self.selected = idx
        expert = torch.index_select(torch.stack(list(self.expert)), 0, idx)  # (B, L_e, d); a deterministic backward
        prompt = torch.cat([self.general.unsqueeze(0).expand(q.shape[0], -1, -1), expert], dim=1)
        return prepend(prompt, embeds, mask, extra)
