"""The training settings (one typed config) and the one place a device name is resolved."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from adapters import DEFAULT_HEAD_LR, DeltaConfig, get_method
from .dropout import DROPOUT_MASKS
from adapters.precision import PRECISIONS

from . import distributed
from .malloc import MALLOC

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


MAX_STEPS = 10_000_000  # per task; far beyond any delta's schedule, and a typo (10**12) is refused


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one task (or one joint step) is trained.

    ``lr=None`` uses each method's own default learning rate (``DeltaConfig.default_lr``).
    ``seed``, ``device`` and ``progress`` are the single source of these settings: a stream run
    takes its seed, device and progress bars from here (task ``j`` trains with a seed derived from
    ``seed``, see :func:`continual.scheduler.task_seed`)."""

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
    device: str | None = None
    progress: bool = True
    # -- speed (see continual.training.step); the defaults reproduce the plain fp32 loop ----------
    precision: str = "fp32"      # fp32 | bf16 | fp16 | auto (bf16 on a GPU that has it, else fp32)
    compile: str | None = None   # None, or a torch.compile mode (COMPILE_MODES)
    bucket: bool = False         # length-bucketed batches (less padding); pads to a multiple of 8
    log_every: int = 10          # steps between records; the loss is read back (a host sync) only then
    # False: train with every dropout off (the model stays in eval mode; gradients flow the same).
    # A deterministic forward: an N-process run then matches one process to float rounding, where
    # with dropout each process draws its own masks (see continual.training.distributed)
    dropout: bool = True
    # how the frozen backbone's dropout masks are drawn on a CPU: "torch" (bernoulli_, one random
    # number per element) or "fast" (16 random bits per element, p rounded to 1/65536: about a
    # quarter of a CPU training step less; see continual.training.dropout). No effect on a GPU.
    dropout_masks: str = "torch"
    # "hold": on a CPU, glibc keeps freed memory for reuse (process-wide, until the process ends),
    # so a step's temporaries stop page-faulting: a sixth to a quarter of a MiniLM step on 2 cores (see
    # continual.training.malloc). "default": the C library's own behaviour.
    malloc: str = "default"
    # several processes (torchrun): shard the frozen backbone's blocks across them (FSDP2) instead
    # of a full copy in each; the deltas stay replicated (see continual.training.distributed)
    shard_backbone: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting, before anything is loaded or trained.

        A NaN or negative learning rate would train all-NaN deltas and still print an accuracy:
        such settings are refused here, not discovered in the numbers."""
        rates = {"lr": self.lr, "head_lr": self.head_lr}
        for name, v in rates.items():
            if v is not None and not _finite(v, lambda x: x > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name, v in {"weight_decay": self.weight_decay, "grad_clip": self.grad_clip}.items():
            if not _finite(v, lambda x: x >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not _finite(self.warmup_ratio, lambda x: 0 <= x <= 1):
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        ints = {"max_steps": self.max_steps, "batch_size": self.batch_size, "eval_every": self.eval_every,
                "max_length": self.max_length, "log_every": self.log_every}
        for name, v in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_steps > MAX_STEPS:  # the warm-up alone (warmup_ratio of them) would outlast any run
            raise ValueError(f"max_steps {self.max_steps} is more than the {MAX_STEPS:,} steps per task this accepts "
                             f"(its warm-up alone would be {self.warmup_steps():,} steps at a learning rate near 0)")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience must be None (never stop early) or an integer >= 1, got {self.patience!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or a torch.compile mode, got {self.compile!r}")
        if self.dropout_masks not in DROPOUT_MASKS:
            raise ValueError(f"dropout_masks must be one of {DROPOUT_MASKS}, got {self.dropout_masks!r}")
        if self.malloc not in MALLOC:
            raise ValueError(f"malloc must be one of {MALLOC}, got {self.malloc!r}")

    def torch_device(self) -> torch.device:
        """The device this config names (``None``: CUDA when there is a GPU, else the CPU)."""
        return resolve_device(self.device)

    @classmethod
    def fast(cls, **overrides: Any) -> "TrainConfig":
        """The fast path: bf16 and torch.compile on a GPU, length buckets everywhere, fast dropout
        masks and freed memory held for reuse (``malloc="hold"``) on a CPU.

        ``compile="reduce-overhead"`` (CUDA graphs) is much faster again at moderate batch sizes
        in benchmarks/speed.py, but is not yet the default: its use inside this loop (varying
        bucket shapes, dev evaluation between steps) has not been verified on a GPU."""
        device = overrides.get("device")
        gpu = (device is None and torch.cuda.is_available()) or str(device).startswith("cuda")
        opts = {"precision": "auto", "compile": "default" if gpu else None, "bucket": True, "dropout_masks": "fast",
                "malloc": "hold"}
        return cls(**{**opts, **overrides})

    @classmethod
    def command_line(cls) -> "TrainConfig":
        """What every training command (``run``, ``compare``, ``combine``) starts from: shorter
        CPU-sized schedules than the library's defaults, and the fast path's speed settings
        except ``compile``. The parser reads its defaults from here, so no command trains with
        another recipe than the others."""
        return cls(max_steps=200, batch_size=16, max_length=64, eval_every=50, precision="auto", bucket=True,
                   dropout_masks="fast", malloc="hold")

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


def _finite(v: Any, ok: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


def check_lengths(model: Any, max_length: int, methods: Sequence[DeltaConfig] = ()) -> None:
    """Refuse a ``max_length`` (plus the positions prompt-like methods prepend) longer than the
    backbone's position table, before anything is trained: past it the model fails in a CUDA
    kernel or silently wraps positions."""
    limit = position_limit(model)
    added = max((get_method(m.method).positions_added(m) for m in methods), default=0)
    if limit is not None and max_length + added > limit:
        extra = f" + {added} prepended positions ({', '.join(m.method for m in methods)})" if added else ""
        raise ValueError(f"max_length {max_length}{extra} exceeds the {limit} positions of the backbone "
                         f"{getattr(model, 'backbone_name', '')!r}; use a max_length of at most {limit - added}")


def position_limit(model: Any) -> int | None:
    """How many token positions the backbone can encode (None: no fixed limit known)."""
    cfg = model.backbone.config
    limits = [getattr(cfg, "max_position_embeddings", None)]
    if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "mpnet"):
        limits = [limits[0] - (cfg.pad_token_id or 0) - 1 if limits[0] else None]  # positions start after padding_idx
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return _per_process(dev)


def _per_process(dev: torch.device) -> torch.device:
    # under torchrun each process of a node takes its own GPU: cuda -> cuda:LOCAL_RANK
    if dev.type == "cuda" and dev.index is None and distributed.env_world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return dev
