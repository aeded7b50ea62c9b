"""The training settings (one typed config) and the one place a device name is resolved."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Sequence

import torch

from adapters import DEFAULT_HEAD_LR, DeltaConfig, get_method
from .dropout import DROPOUT_MASKS
from adapters.precision import PRECISIONS

from . import distributed
from .malloc import MALLOC

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


MAX_STEPS = 10_000_000  # per task; far beyond any delta's schedule, and a typo (10**12) is refused
# AdamW moves every weight by about the learning rate in each step: far above 1 nothing trains (the
# loss diverges, caught by the protocol), and near float32's limit the update itself overflows
MAX_LR = 100.0
MAX_SEED = 2**63 - 1  # every torch and numpy generator takes a seed in [0, MAX_SEED]
# a run's own seed: the per-task seeds derived from it (continual.scheduler.task_seed) stay inside MAX_SEED
MAX_RUN_SEED = 2**32 - 1


Precision = Literal["fp32", "bf16", "fp16", "auto"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
DropoutMasks = Literal["torch", "fast"]
Malloc = Literal["default", "hold"]
Router = Literal["prototype", "linear", "mahalanobis", "perplexity"]
ROUTERS = ("prototype", "linear", "mahalanobis", "perplexity")  # fusion.routing.ROUTERS, named here so a config is checked without importing it


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What is trained: the schedule, rates, batch, lengths, seed. Its JSON is a run's identity
    (what must be equal to resume it); validated once, when it is made.

    ``lr=None`` uses each method's own default learning rate (``DeltaConfig.default_lr``); task
    ``j`` of a stream trains with a seed derived from ``seed`` (:func:`continual.scheduler.task_seed`)."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float | None = None
    head_lr: float = DEFAULT_HEAD_LR
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    eval_every: int = 100
    patience: int | None = 3
    max_length: int = 128
    grad_clip: float = 1.0
    seed: int = 0
    # False: train with every dropout off (the model stays in eval mode; gradients flow the same).
    # A deterministic forward: an N-process run then matches one process to float rounding, where
    # with dropout each process draws its own masks (see continual.training.distributed)
    dropout: bool = True
    # how a stream's test examples are sent to a task when no task id is given (the task-agnostic
    # matrix, continual.agnostic): fitted inside the run on the tasks seen so far
    # (mahalanobis: the nearest task mean under a pooled, shrunk covariance; it routed the default
    # stream best of the three and, like prototype, keeps no example: benchmarks/results/routing-default-cpu.md)
    router: Router = "mahalanobis"

    def __post_init__(self) -> None:
        Recipe._check(self)

    def _check(self) -> None:
        """``ValueError`` naming the setting. A NaN or negative learning rate would train all-NaN
        deltas and still print an accuracy: such settings are refused here, not found in the numbers."""
        for name, v in {"lr": self.lr, "head_lr": self.head_lr}.items():
            if v is not None and not _finite(v, lambda x: 0 < x <= MAX_LR):
                raise ValueError(f"{name} must be a number > 0 and <= {MAX_LR:g}, got {v!r}")
        for name, v in {"weight_decay": self.weight_decay, "grad_clip": self.grad_clip}.items():
            if not _finite(v, lambda x: x >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not _finite(self.warmup_ratio, lambda x: 0 <= x <= 1):
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        ints = {"max_steps": self.max_steps, "batch_size": self.batch_size, "eval_every": self.eval_every,
                "max_length": self.max_length}
        for name, v in ints.items():
            _whole(name, v)
        if self.max_steps > MAX_STEPS:  # the warm-up alone (warmup_ratio of them) would outlast any run
            raise ValueError(f"max_steps {self.max_steps} is more than the {MAX_STEPS:,} steps per task this accepts "
                             f"(its warm-up alone would be {math.ceil(self.warmup_ratio * self.max_steps):,} steps at a "
                             "learning rate near 0)")
        check_seed("seed", self.seed)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience must be None (never stop early) or an integer >= 1, got {self.patience!r}")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how a recipe runs: device, precision, compile, batching, dropout masks, memory,
    sharding, progress. Never part of a run's identity; validated once, when it is made. The
    defaults reproduce the plain fp32 loop (:meth:`TrainConfig.fast` and
    :meth:`TrainConfig.command_line` give the fast ones)."""

    device: str | None = None
    progress: bool = True
    precision: Precision = "fp32"  # auto: bf16 on a GPU that has it and on a CPU with bf16 matrix units
    compile: CompileMode | None = None
    bucket: bool = False           # length-bucketed batches (less padding); pads to a multiple of 8
    log_every: int = 10            # steps between records; the loss is read back (a host sync) only then
    # how the frozen backbone's dropout masks are drawn on a CPU: "torch" (bernoulli_, one random
    # number per element) or "fast" (16 random bits per element, p rounded to 1/65536: about a
    # quarter of a CPU training step less; see continual.training.dropout). No effect on a GPU.
    dropout_masks: DropoutMasks = "torch"
    # "hold": on a CPU, glibc keeps freed memory for reuse (process-wide, until the process ends),
    # so a step's temporaries stop page-faulting (see continual.training.malloc)
    malloc: Malloc = "default"
    # several processes (torchrun): shard the frozen backbone's blocks across them (FSDP2) instead
    # of a full copy in each; the deltas stay replicated (see continual.training.distributed)
    shard_backbone: bool = False

    def __post_init__(self) -> None:
        Runtime._check(self)

    def _check(self) -> None:
        _whole("log_every", self.log_every)
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("dropout_masks", self.dropout_masks, DROPOUT_MASKS),
                                     ("malloc", self.malloc, MALLOC)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or a torch.compile mode, got {self.compile!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Recipe, Runtime):
    """A :class:`Recipe` and the :class:`Runtime` it runs with, in one object (every field of
    both), validated once when made: code below the edge that builds it trusts it."""

    def __post_init__(self) -> None:
        Recipe._check(self)
        Runtime._check(self)

    @classmethod
    def of(cls, recipe: Recipe, runtime: Runtime) -> "TrainConfig":
        return cls(**dataclasses.asdict(recipe), **dataclasses.asdict(runtime))

    def recipe(self) -> Recipe:
        return Recipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)})

    def runtime(self) -> Runtime:
        return Runtime(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Runtime)})

    def validate(self) -> None:
        """The checks the constructor ran (kept for callers that construct by other means)."""
        Recipe._check(self)
        Runtime._check(self)

    def torch_device(self) -> torch.device:
        """The device this config names (``None``: CUDA when there is a GPU, else the CPU)."""
        return resolve_device(self.device)

    @classmethod
    def fast(cls, **overrides: Any) -> "TrainConfig":
        """The fast path: bf16 and torch.compile with CUDA graphs (``"reduce-overhead"``) on a GPU,
        length buckets everywhere, fast dropout masks and freed memory held for reuse
        (``malloc="hold"``) on a CPU.

        CUDA graphs were checked in the real loop (``benchmarks/compile_loop.py``: a stream of
        per-task LoRAs, bucketed shapes, dev scoring between steps; H200, MiniLM, bf16): the
        same losses, dev scores and R as ``compile="default"`` to the last digit, no CUDA-graph
        skips, 2.0x its training rate once compiled (2.9x uncompiled) and less peak memory.
        Compiling costs about 25-40 s per task (each task's fresh delta compiles again), so at
        that size it pays only for tasks of more than about 2,000 steps; on SmolLM2 (30 layers)
        the compilation took longer than the 125 s the check gave it, so decoders were not checked
        to the end. See docs/speed.md."""
        device = overrides.get("device")
        gpu = (device is None and torch.cuda.is_available()) or str(device).startswith("cuda")
        opts = {"precision": "auto", "compile": "reduce-overhead" if gpu else None, "bucket": True,
                "dropout_masks": "fast", "malloc": "hold"}
        return cls(**{**opts, **overrides})

    @classmethod
    def command_line(cls) -> "TrainConfig":
        """What every training command (``run``, ``compare``, ``combine``) starts from: shorter
        CPU-sized schedules than the library's defaults, and the fast path's speed settings
        except ``compile``. The parser reads its defaults from here, so no command trains with
        another recipe than the others."""
        return cls.fast(compile=None, max_steps=200, batch_size=16, max_length=64, eval_every=50)

    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.max_steps)


@dataclasses.dataclass
class TrainResult:
    """What training one step gives back: the best dev scores and when they were reached."""

    best_dev: dict[str, float]
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, Any]]


def check_seed(name: str, v: Any, limit: int = MAX_SEED) -> None:
    """``ValueError`` naming the setting unless ``v`` is an integer in [0, ``limit``]: numpy refuses
    a negative seed with a message that names nothing, and torch one past 64 bits."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit:
        raise ValueError(f"{name} must be an integer in [0, {limit}], got {v!r}")


def _whole(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _finite(v: Any, ok: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


def check_lengths(model: Any, max_length: int, methods: Sequence[DeltaConfig] = (), shortest: int | None = None,
                  source: str = "") -> None:
    """Refuse a ``max_length`` (plus the positions prompt-like methods prepend) longer than the
    backbone's position table, before anything is trained: past it the model fails in a CUDA
    kernel or silently wraps positions. Refuse too a length (``shortest``: the smallest in use,
    default ``max_length``) that leaves no room for text after the tokenizer's special tokens:
    there a tokenizer keeps special tokens only (no text at all), or, below their count, gives up
    truncating and returns whole texts of any length. ``source`` says where ``max_length`` came
    from when not from the run's setting (a task's own, e.g. " (task bbc's own)")."""
    tokenizer = getattr(model, "tokenizer", None)
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    shortest = max_length if shortest is None else shortest
    if shortest <= special:
        raise ValueError(f"max_length {shortest} leaves no room for text: the tokenizer of "
                         f"{getattr(model, 'backbone_name', '')!r} adds {special} special tokens to every example; "
                         f"use a max_length of at least {special + 1}")
    limit = position_limit(model)
    added = positions_added(methods)
    if limit is not None and max_length + added > limit:
        adding = [m.method for m in methods if get_method(m.method).positions_added(m)]  # not the whole combination
        extra = f" + {added} prepended positions ({', '.join(adding)})" if added else ""
        # each remedy offered must work on its own: a max_length that leaves room for the special
        # tokens and a token of text, or a count of prepended positions that fits beside this
        # max_length; where neither alone does, both must move
        fixes = []
        if limit - added > special:
            fixes.append(f"use a max_length of at most {limit - added}")
        if added and max_length < limit:
            fixes.append(f"prepend at most {limit - max_length} positions (e.g. num_tokens)")
        fix = " or ".join(fixes) or (f"use a smaller max_length and prepend fewer positions "
                                     f"(max_length + prepended positions at most {limit})")
        raise ValueError(f"max_length {max_length}{source}{extra} exceeds the {limit} positions of the backbone "
                         f"{getattr(model, 'backbone_name', '')!r}; {fix}")


def positions_added(methods: Sequence[DeltaConfig]) -> int:
    """Positions ``methods`` (one task's combination, or every active task's) prepend to an input:
    each active input transform prepends its own tokens in turn, so they add up."""
    return sum(get_method(m.method).positions_added(m) for m in methods)


def position_limit(model: Any) -> int | None:
    """How many token positions the backbone can encode (None: no fixed limit known)."""
    # a table of absolute positions as DeltaModel reads it (adapters.inputs.position_table: RoBERTa's
    # and MPNet's counted from after their padding index); else the configured rotary/relative length
    table = getattr(model, "max_positions", None)
    limits = [table if table is not None else getattr(model.backbone.config, "max_position_embeddings", None)]
    tokenizer_max = getattr(getattr(model, "tokenizer", None), "model_max_length", None)
    limits.append(tokenizer_max if isinstance(tokenizer_max, int) and tokenizer_max < 1_000_000 else None)
    known = [x for x in limits if isinstance(x, int) and x > 0]
    return min(known) if known else None


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when there is a GPU, else the CPU. The only place a device name is read."""
    if device is None:
        return _per_process(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):  # meta, mps, xla...: failed later in autocast, or trained on nothing (meta)
        raise ValueError(f"device {device!r}: this tool trains on cpu or cuda (cuda:N for one GPU of several)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return _per_process(dev)


def _per_process(dev: torch.device) -> torch.device:
    # under torchrun each process of a node takes its own GPU: cuda -> cuda:LOCAL_RANK
    if dev.type == "cuda" and dev.index is None and distributed.env_world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return dev
