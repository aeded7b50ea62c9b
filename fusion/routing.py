"""Task-free inference: an example arrives without its task; pick the delta and head for it.

Routers work on the frozen backbone's own sentence embedding (mean-pooled, L2-normalised, no delta
active). MiniLM was trained for exactly this (sentence similarity), and the embedding costs one
backbone pass that no task delta changes, so it can be computed once per request.

- :class:`MahalanobisRouter` (default): the nearest task mean under one covariance pooled over
  the tasks and shrunk (ABSCL's selector, with Ledoit-Wolf shrinkage). Incremental: a new task adds
  its mean and its scatter to one d x d sum; no example is kept, old means never move.
- :class:`PrototypeRouter`: the mean embedding of each (task, label) pair; an example goes to the
  task of its most similar prototype (cosine). Also incremental and keeps no data. Per-label
  prototypes, rather than one per task, keep tasks whose classes lie far apart (news topics) from
  being averaged into one blurred point.
- :class:`LinearRouter`: softmax regression over the stored embeddings of every task seen so far
  (needs those features kept: feature replay); shown for comparison.
- :class:`~fusion.perplexity.PerplexityRouter` (AdapterCL's selection) reads no embedding: each
  task's deltas score how surprising the input is to them (a prompt's perplexity, a head's
  entropy), and the least surprised task answers; one pass per task so far for every input.

:func:`route_and_score` routes every test example of a stream, serves them all through one
mixed-task model (each example through its routed task's delta and head, in one batch), and
scores the predicted *label name* against the gold one, next to the oracle (true task) score.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch

from adapters import DeltaModel
from adapters.errors import non_finite_rows, refuse_non_finite
from adapters.heads import pool
from adapters.precision import autocast, inference_linears, resolve_precision

from .perplexity import PerplexityRouter, surprise


@torch.no_grad()
def embed(model: DeltaModel, batches: Any, precision: str = "fp32") -> torch.Tensor:
    """L2-normalised mean-pooled backbone embeddings (no delta acts) of tokenised ``batches``,
    computed in ``precision`` ("bf16": under bf16 autocast, as a run in bf16 scores)."""
    out = []
    was_training = model.training
    model.eval()
    with model.disabled(), autocast(resolve_precision(precision, model.device), model.device), inference_linears(model):
        for b in batches:
            ids, mask = b["input_ids"].to(model.device), b["attention_mask"].to(model.device)
            hidden, _ = model.encode(ids, mask)  # (an encoder-decoder: its encoder's states)
            out.append(torch.nn.functional.normalize(pool(hidden.float(), mask, "mean"), dim=-1).cpu())
    model.train(was_training)
    out = torch.cat(out) if out else torch.zeros(0, 0)
    # a NaN embedding is nearest to no prototype and routes to the first task without a word
    refuse_non_finite(non_finite_rows(out, minus_inf=False), "the router's backbone embeddings")
    return out


def _check_fit(router: Any, task: str, embeddings: torch.Tensor, labels: Sequence[int]) -> None:
    """Refuse what a router would learn wrong without a word: a task added twice (two slots of one
    name split its examples), labels that do not pair with the rows, rows of another width."""
    if task in router.tasks:
        raise ValueError(f"task {task!r} is already in the router; each task is added once")
    if embeddings.dim() != 2 or len(embeddings) == 0:
        raise ValueError(f"task {task!r}: no examples to fit on; embeddings must be (examples, dim), got shape "
                         f"{tuple(embeddings.shape)}")
    if len(labels) != len(embeddings):
        raise ValueError(f"task {task!r}: {len(labels)} labels for {len(embeddings)} embeddings")
    if router.dim is not None and embeddings.shape[1] != router.dim:
        raise ValueError(f"task {task!r}: embeddings of width {embeddings.shape[1]}, earlier tasks' {router.dim}")
    router.dim = embeddings.shape[1]


def _check_predict(router: Any, embeddings: torch.Tensor) -> None:
    if not router.tasks:
        raise ValueError("the router has no tasks yet: add_task before predict")
    if embeddings.dim() != 2 or embeddings.shape[1] != router.dim:
        raise ValueError(f"embeddings must be (examples, {router.dim}), got shape {tuple(embeddings.shape)}")


class PrototypeRouter:
    """Nearest (task, label) prototype by cosine similarity; incremental, keeps no data."""

    name = "prototype"
    summary = "the task of the nearest (task, label) mean embedding, by cosine; keeps no example"

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.dim: int | None = None  # of the embeddings, set by the first task
        self._protos: list[torch.Tensor] = []
        self._owner: list[int] = []

    def add_task(self, task: str, embeddings: torch.Tensor, labels: Sequence[int]) -> None:
        _check_fit(self, task, embeddings, labels)
        labels = torch.as_tensor(list(labels))
        slot = len(self.tasks)
        self.tasks.append(task)
        for c in labels.unique().tolist():
            self._protos.append(torch.nn.functional.normalize(embeddings[labels == c].mean(0), dim=0))
            self._owner.append(slot)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Task slots (positions in ``self.tasks``)."""
        _check_predict(self, embeddings)
        sims = embeddings @ torch.stack(self._protos).t()
        return torch.as_tensor(self._owner)[sims.argmax(1)]


class LinearRouter:
    """Softmax regression on stored embeddings of all tasks (refit after each new task)."""

    name = "linear"
    summary = "softmax regression refitted on every task's stored embeddings (feature replay)"
    seeded = True

    def __init__(self, epochs: int = 300, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0) -> None:
        self.tasks: list[str] = []
        self.dim: int | None = None
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self.epochs, self.lr, self.weight_decay, self.seed = epochs, lr, weight_decay, seed
        self.linear: torch.nn.Linear | None = None

    def add_task(self, task: str, embeddings: torch.Tensor, labels: Sequence[int]) -> None:
        _check_fit(self, task, embeddings, labels)
        self._x.append(embeddings)
        self._y.append(torch.full((len(embeddings),), len(self.tasks)))
        self.tasks.append(task)
        self._fit()

    def _fit(self) -> None:
        x, y = torch.cat(self._x), torch.cat(self._y)
        g = torch.Generator().manual_seed(self.seed)
        linear = torch.nn.Linear(x.shape[1], len(self.tasks))
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.01)
            linear.bias.zero_()
        # classes balanced: a big task must not swallow a small one
        weight = (len(y) / (len(self.tasks) * torch.bincount(y).float()))
        opt = torch.optim.Adam(linear.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs):  # full batch: a few thousand 384-d rows
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear(x * 10), y, weight=weight).backward()
            opt.step()
        self.linear = linear

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        _check_predict(self, embeddings)
        return self.linear(embeddings * 10).argmax(1)


class MahalanobisRouter:
    """Nearest task mean under one covariance shared by every task (Mahalanobis distance);
    incremental, keeps no data.

    From Ding et al. 2024, "Boosting Large Language Models with Continual Learning for Aspect-based
    Sentiment Analysis" (arXiv:2405.05496; ABSCL in EasyCL): an input without its task id goes to
    the task t minimising (x − μ_t)ᵀ Σ⁻¹ (x − μ_t), μ_t the mean feature of task t's training
    inputs and Σ the within-task covariance pooled over all tasks so far. A new task adds only its
    sufficient statistics (its mean, its scatter Σ_x (x − μ_t)(x − μ_t)ᵀ added to one d × d sum,
    and the scalar Σ_x ‖x − μ_t‖⁴), so no example is kept and old tasks' means never move; Σ is
    re-estimated from the sums, which is what makes old routes sharpen as tasks arrive.

    Departures: the feature is the one every router here reads (the frozen backbone's
    mean-pooled, L2-normalised embedding; ABSCL: a decoder's last-token state of its second-to-last
    layer). Σ is the Ledoit-Wolf estimate (Ledoit and Wolf 2004, "A well-conditioned estimator for
    large-dimensional covariance matrices"): the pooled sample covariance shrunk towards tr(S)/d · I
    by the weight their formula gives from the same sums, where ABSCL adds 1e-5 to the diagonal;
    MiniLM's 384-d features from a first task of a few hundred examples give a singular S, whose
    near-null directions a fixed 1e-5 turns into huge distances (measured in
    benchmarks/results/routing-default-cpu.md). Where even the Ledoit-Wolf Σ is singular (a couple
    of examples in all, or no spread at all), the plain nearest mean is used (weight 1).
    ``shrinkage`` (0 to 1) fixes the weight instead; a singular Σ at that weight is refused.
    """

    name = "mahalanobis"
    summary = "the nearest task mean under one pooled, shrunk covariance (ABSCL's selector); keeps no example"

    def __init__(self, shrinkage: float | None = None) -> None:
        if shrinkage is not None and not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be None (Ledoit-Wolf) or in [0, 1], got {shrinkage!r}")
        self.tasks: list[str] = []
        self.dim: int | None = None
        self.shrinkage = shrinkage
        self._means: list[torch.Tensor] = []
        self._scatter: torch.Tensor | None = None  # float64: sums over thousands of rows
        self._fourth = 0.0
        self._count = 0
        self._precision: torch.Tensor | None = None  # Σ⁻¹, refreshed by add_task
        self.weight: float | None = None  # the shrinkage weight in use

    def add_task(self, task: str, embeddings: torch.Tensor, labels: Sequence[int]) -> None:
        _check_fit(self, task, embeddings, labels)
        x = embeddings.double()
        mean = x.mean(0)
        centred = x - mean
        scatter = centred.t() @ centred if self._scatter is None else self._scatter + centred.t() @ centred
        fourth = self._fourth + float((centred.pow(2).sum(1) ** 2).sum())
        count = self._count + len(x)
        # estimated before anything is kept: a refused task leaves the router as it was
        self._precision, self.weight = self._estimate(scatter, fourth, count, [*self.tasks, task])
        self._scatter, self._fourth, self._count = scatter, fourth, count
        self._means.append(mean)
        self.tasks.append(task)

    def _estimate(self, scatter: torch.Tensor, fourth: float, n: int, tasks: list[str]) -> tuple[torch.Tensor, float]:
        """Σ⁻¹ and the weight from the sums: S = scatter / N shrunk towards m·I, m = tr(S) / d."""
        d = scatter.shape[0]
        sample = scatter / n
        m = float(torch.trace(sample)) / d
        eye = torch.eye(d, dtype=sample.dtype)
        if self.shrinkage is not None:
            weight = self.shrinkage
        else:  # Ledoit-Wolf: b̄² = (1/N²) Σ ‖x xᵀ − S‖²_F = (Σ ‖x‖⁴ / N − ‖S‖²_F) / N, d² = ‖S − m I‖²_F
            spread = float(((sample - m * eye) ** 2).sum())
            noise = (fourth / n - float((sample ** 2).sum())) / n
            weight = 1.0 if spread <= 0 else min(max(noise, 0.0), spread) / spread
        cov = (1 - weight) * sample + weight * m * eye
        if m <= 0 or torch.linalg.matrix_rank(cov) < d:
            if self.shrinkage is not None:
                raise ValueError(f"the pooled covariance of tasks {tasks} is singular at shrinkage {weight:.3g} "
                                 "(identical embeddings, or fewer examples than dimensions with no shrinkage); "
                                 "leave shrinkage to Ledoit-Wolf (None) or give a weight above 0")
            # a handful of examples (two mirror-image rows give b̄² = 0), or none apart from its
            # task's mean (m = 0): the estimate has nothing to go on, so the nearest mean in the plain metric
            weight, cov = 1.0, (m if m > 0 else 1.0) * eye
        return torch.linalg.inv(cov), weight

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        _check_predict(self, embeddings)
        # (x − μ)ᵀP(x − μ) = xᵀPx − 2 xᵀPμ + μᵀPμ: no (examples, tasks, d) tensor
        x, means = embeddings.double(), torch.stack(self._means)
        xp = x @ self._precision
        dist = (xp * x).sum(1, keepdim=True) - 2 * xp @ means.t() + ((means @ self._precision) * means).sum(1)
        return dist.argmin(1)


ROUTERS = {"prototype": PrototypeRouter, "linear": LinearRouter, "mahalanobis": MahalanobisRouter,
           "perplexity": PerplexityRouter}


def reads_surprise(router: Any) -> bool:
    """Whether ``router`` (a router or its class) routes by the deltas' surprise (an (examples,
    tasks) matrix from :func:`~fusion.perplexity.surprise`) rather than by embeddings."""
    return getattr(router, "reads", "embeddings") == "surprise"


def router_refusal(name: str, generative: Sequence[bool], encoder_decoder: bool) -> str | None:
    """Why router ``name`` cannot route tasks of these kinds (one ``generative`` flag per task) on
    such a model, from its own ``refusal``; None where it can (every embedding router)."""
    why = getattr(ROUTERS[name], "refusal", None)
    return why(generative, encoder_decoder) if why else None


def make_router(name: str, seed: int = 0) -> Any:
    """A new router of ``name`` (a key of :data:`ROUTERS`); ``seed`` reaches those that draw
    random numbers (``seeded = True``), the others are deterministic."""
    cls = ROUTERS[name]
    return cls(seed=seed) if getattr(cls, "seeded", False) else cls()


@dataclasses.dataclass
class RoutingResult:
    """``confusion[i, j]``: test examples of task i routed to task j."""

    router: str
    tasks: list[str]
    confusion: np.ndarray
    routed_accuracy: dict[str, float]
    oracle_accuracy: dict[str, float]
    seconds: float = 0.0

    @property
    def routing_accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.confusion.sum())

    @property
    def routed_acc(self) -> float:
        return float(np.mean(list(self.routed_accuracy.values())))

    @property
    def oracle_acc(self) -> float:
        return float(np.mean(list(self.oracle_accuracy.values())))

    def summary(self) -> dict[str, float]:
        return {"routing_accuracy": self.routing_accuracy, "routed_ACC": self.routed_acc, "oracle_ACC": self.oracle_acc}

    def table(self) -> str:
        lines = [f"router: {self.router}", "| task | routed to own task | ACC routed | ACC oracle |", "|---|---|---|---|"]
        for i, t in enumerate(self.tasks):
            lines.append(f"| {t} | {self.confusion[i, i] / self.confusion[i].sum():.3f} | {self.routed_accuracy[t]:.3f} "
                         f"| {self.oracle_accuracy[t]:.3f} |")
        s = self.summary()
        lines.append(f"| **all** | **{s['routing_accuracy']:.3f}** | **{s['routed_ACC']:.3f}** | **{s['oracle_ACC']:.3f}** |")
        return "\n".join(lines)


@torch.no_grad()
def _predict_names(mixed: Any, batches: list[dict[str, torch.Tensor]], slots: torch.Tensor,
                   labels: list[list[str]]) -> list[str]:
    names, start, bad = [], 0, 0
    for b in batches:
        n = b["input_ids"].shape[0]
        s = slots[start:start + n]
        logits = mixed(b["input_ids"].to(mixed.head_w.device), b["attention_mask"].to(mixed.head_w.device), task_ids=s)
        names += [labels[int(t)][int(p)] for t, p in zip(s, logits.argmax(-1).cpu())]
        bad += non_finite_rows(logits)
        start += n
    refuse_non_finite(bad, "routed mixed-task scoring")
    return names


@dataclasses.dataclass
class RoutingData:
    """What routers are fitted and scored on, computed once and shared by every router.

    ``train_emb`` / ``fit_labels``: task -> training embeddings and labels; ``test``: task -> its
    tokenised test batches, ``test_emb`` their embeddings, ``gold`` the gold label names."""

    tasks: list[str]
    train_emb: dict[str, torch.Tensor]
    fit_labels: dict[str, list[int]]
    test: dict[str, list[dict[str, torch.Tensor]]]
    test_emb: dict[str, torch.Tensor]
    gold: dict[str, list[str]]
    oracle: dict[str, float] | None = None

    @classmethod
    def build(cls, model: DeltaModel, tasks: Sequence[str], train: dict[str, Any], fit_labels: dict[str, list[int]],
              test: dict[str, Any], gold: dict[str, list[str]], precision: str = "fp32") -> "RoutingData":
        """``train`` / ``test``: task -> tokenised batches (lists, iterated more than once);
        embedded in ``precision`` (see :func:`embed`)."""
        return cls(list(tasks), {t: embed(model, train[t], precision) for t in tasks}, fit_labels, test,
                   {t: embed(model, test[t], precision) for t in tasks}, gold)


def generated_answers(mixed: Any, batches: list[dict[str, Any]], slots: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy answers of generative tasks, example i through the delta of task slot ``slots[i]``."""
    from adapters.generation import answer_batches

    return answer_batches(mixed._model(), batches, max_new_tokens, mixed=mixed, task_ids=slots)


def route_and_score(model: DeltaModel, data: RoutingData, router: Any,
                    answer: Callable[[Any, list, torch.Tensor], list[str]] | None = None,
                    match: Callable[[str, list[str], list[str]], float] | None = None,
                    precision: str = "fp32") -> RoutingResult:
    """Fit ``router`` task by task (stream order), route every test example, serve all of them
    through one mixed-task model, and score predicted label names against the gold ones, with
    routed tasks and (once per ``data``) with the true tasks. The serving runs in ``precision``
    (the routers fit in fp32 whatever it is).

    Generative tasks pass ``answer(mixed, batches, slots)`` (e.g. :func:`generated_answers`) and
    ``match(task, answers, gold)`` (the task's own text metric) instead of label names."""
    tasks = data.tasks
    for t in tasks:
        router.add_task(t, data.train_emb[t], data.fit_labels[t])
    mixed = model.mixed(tasks)
    confusion = np.zeros((len(tasks), len(tasks)), dtype=np.int64)
    routed = {}
    if answer is None:
        label_names = [model.task(t).label_names or [str(i) for i in range(model.task(t).head.num_labels)] for t in tasks]
        answer = lambda m, batches, slots: _predict_names(m, batches, slots, label_names)  # noqa: E731
    if match is None:
        match = lambda t, preds, gold: float(np.mean([a == g for a, g in zip(preds, gold)]))  # noqa: E731
    score = lambda t, slots: match(t, answer(mixed, data.test[t], slots), data.gold[t])  # noqa: E731
    device = model.device
    if reads_surprise(router):  # each task's deltas judge every input (per-task: active = own)
        slots = {t: router.predict(torch.stack([surprise(model, data.test[t], (k,), precision) for k in tasks], 1))
                 for t in tasks}
    else:
        slots = {t: router.predict(data.test_emb[t]) for t in tasks}  # (in fp32: outside the serving's autocast)
    for i, t in enumerate(tasks):
        np.add.at(confusion[i], slots[t].numpy(), 1)
    try:
        with torch.no_grad(), autocast(resolve_precision(precision, device), device), inference_linears(model):
            for t in tasks:
                routed[t] = score(t, slots[t])
            if data.oracle is None:
                data.oracle = {t: score(t, torch.full((len(data.gold[t]),), i)) for i, t in enumerate(tasks)}
    finally:
        mixed.detach()
    return RoutingResult(router.name, tasks, confusion, routed, dict(data.oracle))
