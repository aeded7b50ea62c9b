"""``i-lora``: replay with two copies of the shared delta, a fast one that trains and a slow one
that follows it by interpolation and answers (I-LoRA).

Interpolation-based LoRA, Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter
Efficient Tuning" (2024, arXiv:2402.18865; code: github.com/which47/LLMCL). The paper finds
low-loss paths between the minima a delta reaches on successive tasks (mode connectivity) and
builds a dual-memory replay on it: a *fast* delta θ_w (working memory) trains on each batch of
the new task and on a batch of the replay memory; after every step a *slow* delta θ_l (long-term
memory) moves a little toward it,

    θ_l ← λ · θ_l + (1 − λ) · θ_w,

and a consistency term keeps the fast delta's features on the memory batch close to the slow
delta's, so each step stays near the path the slow delta lies on:

    loss = CE(new batch; θ_w) + CE(memory batch; θ_w) + γ · MSE(h(memory batch; θ_w), h(memory batch; θ_l)).

The slow delta (the interpolation of the fast one's path) is what answers: every score, the
accuracy matrix, the router and the saved checkpoints use it. Defaults: ``interpolation`` λ =
0.25 and ``consistency`` γ = 1, the values of the authors' released script, and replay's
``memory_size=200``. λ = 0.25 keeps the slow delta within about a step of the fast one; a larger λ
is a longer memory (0.99: about a hundred steps), which lags on short tasks: measured on the
built-in streams (benchmarks/results/forgetting-methods-cpu.md), 0.25 scored as high or higher.

How we depart from the paper:

- The memory, its balance over tasks and the memory batch's cross-entropy are replay's
  (:mod:`.replay`; the paper keeps a reservoir buffer and averages the new and memory batches'
  losses, where replay adds them).
- h is the last layer's token states (what a head reads; T5's decoder's for a generative task),
  averaged over the batch's real tokens where the mask lines up with them, over every position
  otherwise (a prompt method's added positions), by default (``features="last"``). The authors'
  released script compares every layer's states and takes, entry by entry, the larger of the two
  as the target, max(h_w, h_l), so only entries where the fast delta's state is below the slow
  one's count, as (h_l − h_w)²; ``features="all-max"`` does that over every transformer block's
  output (T5: its encoder's and, for a generative task, its decoder's blocks), the mean over blocks
  of each block's mean over the real tokens. It leaves out the embeddings' output (the script's
  first hidden state, the same for both copies but a prompt's positions) and takes a Llama-family
  model's last block before its final norm (the script's last hidden state is after it).
- λ warms up as in the released script, λ_k = min(1 − 1/(k + 1), λ) at the k-th step, with k
  counted over the whole stream (the script's count restarts with each task, which would let a
  new task's first steps overwrite half of the long-term memory); the slow delta starts equal to
  the fast one, so before step 1/(1 − λ) it is the running mean of the fast delta's path.
- The last interpolation of a task uses the fast delta as training leaves it: its best-on-dev
  values (the protocol restores them; the dev scores that choose them are the fast delta's).
- The interpolation is over the delta's trained parameters, whatever the method: LoRA's A and B
  (so the slow delta's product BA is not the interpolation of the fast one's), or a prefix's
  reparameterising MLP rather than the prefixes it gives.
- Each task keeps its own head (a classifier, trained through the fast delta; generative tasks
  share the LM head); an earlier task's head stays frozen, as under ``replay``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adapters import DEFAULT_METHOD, DeltaModel
from adapters.model import MethodSpec
from adapters.targets import block_paths
from streams import Task

from ..training import TrainConfig, token_loss
from .base import check_choice, check_option, finite_at_least
from .replay import Replay
from .shared_delta import SHARED

SLOW = "ilora_slow"  # the task holding the slow delta (no head): what answers
FEATURES = ("last", "all-max")  # the consistency term's states: see the module docstring


def states_module(model: DeltaModel, generative: bool) -> torch.nn.Module:
    """The backbone part whose output is the token states a head reads: T5's decoder for a
    generative task (its encoder for a classifier), the backbone itself otherwise."""
    if model.seq2seq:
        return model.backbone.get_decoder() if generative else model.backbone.get_encoder()
    return model.backbone


def state_distance(fast: torch.Tensor, slow: torch.Tensor, mask: torch.Tensor | None,
                   one_sided: bool = False) -> torch.Tensor:
    """Mean squared difference of two (B, T, H) token states over the real tokens of ``mask``
    ((B, T); every position where it is None or does not line up with the states). ``one_sided``:
    the distance to max(fast, slow), entry by entry, so only entries where ``fast`` is below
    ``slow`` count (the released script's target)."""
    diff = slow.float() - fast.float()
    sq = (diff.clamp_min(0) if one_sided else diff) ** 2
    if mask is None or mask.shape != sq.shape[:2]:
        return sq.mean()
    weights = mask.to(sq.dtype).unsqueeze(-1)
    return (sq * weights).sum() / (weights.sum() * sq.shape[-1]).clamp_min(1)


class ILoRA(Replay):
    name = "i-lora"
    description = ("replay with a fast shared delta that trains and a slow one, its running interpolation, that "
                   "answers; a consistency term keeps their features on the memory close (I-LoRA)")
    defaults = {"memory_size": 200, "replay_batch": None, "interpolation": 0.25, "consistency": 1.0, "features": "last"}
    reserved = (SHARED, SLOW)

    def __init__(self, methods: Sequence[MethodSpec] = (DEFAULT_METHOD,), memory_size: int = 200,
                 replay_batch: int | None = None, interpolation: float = 0.25, consistency: float = 1.0,
                 features: str = "last") -> None:
        super().__init__(methods, memory_size, replay_batch)
        check_option(self.name, "interpolation", interpolation, lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_option(self.name, "consistency", consistency, finite_at_least(0), "a finite number >= 0")
        check_choice(self.name, "features", features, FEATURES)
        self.interpolation, self.consistency, self.features = float(interpolation), float(consistency), features
        self.steps = 0  # interpolation steps over the stream so far (λ's warm-up)

    def prepare(self, model: DeltaModel, task: Task) -> None:
        super().prepare(model, task)
        if SLOW not in model.tasks:  # the slow delta starts where the fast one does
            model.add_task(SLOW, self.methods)
            model.task(SLOW).deltas.load_state_dict(model.task(SHARED).deltas.state_dict())
            model.freeze_delta(SLOW)  # never trained (not frozen with folding: it must keep the fast one's shape)

    def active(self, task: str) -> tuple[str, ...]:
        return (SLOW, task)

    def trains_with(self, task: str) -> tuple[str, ...]:
        return (SHARED, task)

    def interpolate(self, model: DeltaModel) -> None:
        """One step of θ_l ← λ_k θ_l + (1 − λ_k) θ_w, λ_k = min(1 − 1/(k + 1), λ)."""
        self.steps += 1
        lam = min(1 - 1 / (self.steps + 1), self.interpolation)
        with torch.no_grad():
            for s, f in zip(model.task(SLOW).deltas.parameters(), model.task(SHARED).deltas.parameters()):
                s.lerp_(f.detach().to(s.dtype), 1 - lam)

    def loss_term(self, model: DeltaModel, task: Task, config: TrainConfig, data: Any):
        draw = self.memory_batches(task, config, self.replay_batch)
        calls = [0]

        def term(batch, labels, logits):
            # called inside step k's forward, so the fast delta holds its values after step k - 1
            # (the first call of a task sees those the last task's final interpolation used)
            calls[0] += 1
            if calls[0] > 1:
                self.interpolate(model)
            return None if draw is None else self.memory_term(model, data, draw())
        return term

    def memory_term(self, model: DeltaModel, data: Any, picks: list[tuple[Task, int]]) -> torch.Tensor:
        """Replay's cross-entropy on the memory batch through the fast delta, plus γ times the
        squared distance of its token states from the slow delta's on the same rows."""
        captured: dict[torch.nn.Module, torch.Tensor] = {}  # each hooked module -> its last output

        def loss(t: Task, rows: list[int], out: torch.Tensor, labels: torch.Tensor, mem: dict) -> torch.Tensor:
            ce = token_loss(out, labels)
            if not self.consistency:
                return ce
            fast = dict(captured)  # the modules this task's forward ran (a T5 classifier: no decoder)
            with torch.no_grad(), model.acting(SLOW, t.name):  # the same batch, through the slow delta
                model(**mem)
            slow = dict(captured)
            captured.clear()
            if self.features == "last":
                where = states_module(model, t.generative)
                mask = None if model.seq2seq and t.generative else mem.get("attention_mask")
                return ce + self.consistency * state_distance(fast[where], slow[where], mask)
            terms = [state_distance(fast[m], slow[m], None if m in decoder else mem.get("attention_mask"), one_sided=True)
                     for m in fast]
            return ce + self.consistency * torch.stack(terms).mean()

        decoder: set[torch.nn.Module] = set()
        if self.features == "last":
            hooks = {states_module(model, g) for g in {t.generative for t, _ in picks}}
        else:
            hooks = {model.backbone.get_submodule(p) for p in block_paths(model.backbone)}
            if model.seq2seq:  # a T5 decoder's states do not line up with the input's mask: every position counts
                decoder = set(model.backbone.get_decoder().modules()) & hooks

        def keep(m: torch.nn.Module, _i: Any, out: Any) -> None:
            captured[m] = out if isinstance(out, torch.Tensor) else out[0]  # a block's tuple, or a model output

        handles = [m.register_forward_hook(keep) for m in hooks]
        try:
            return self.memory_loss(model, data, picks, loss)
        finally:
            for h in handles:
                h.remove()

    def train(self, model, tasks, config, data, callback):
        result = super().train(model, tasks, config, data, callback)
        self.interpolate(model)  # the task's last step: the fast delta's best-on-dev values
        return result

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        return {**super().state(model), "ilora.steps": torch.tensor(self.steps)}

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        self.steps = int(state["ilora.steps"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "interpolation": self.interpolation, "consistency": self.consistency,
                "features": self.features}
