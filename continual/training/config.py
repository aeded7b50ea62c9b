"""The training settings (one typed config) and the one place a device name is resolved."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from adapters.precision import PRECISIONS

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    head_lr: float = 1e-3
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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting, before anything is loaded or trained."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or a torch.compile mode, got {self.compile!r}")
        if self.log_every < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("log_every, max_steps and batch_size must be >= 1")

    def torch_device(self) -> torch.device:
        """The device this config names (``None``: CUDA when there is a GPU, else the CPU)."""
        return resolve_device(self.device)

    @classmethod
    def fast(cls, **overrides: Any) -> "TrainConfig":
        """The fast path: bf16 and torch.compile on a GPU, length buckets everywhere.

        ``compile="reduce-overhead"`` (CUDA graphs) is much faster again at moderate batch sizes
        in benchmarks/speed.py, but is not yet the default: its use inside this loop (varying
        bucket shapes, dev evaluation between steps) has not been verified on a GPU."""
        device = overrides.get("device")
        gpu = (device is None and torch.cuda.is_available()) or str(device).startswith("cuda")
        opts = {"precision": "auto", "compile": "default" if gpu else None, "bucket": True}
        return cls(**{**opts, **overrides})

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


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when there is a GPU, else the CPU. The only place a device name is read."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev
