"""Exceptions raised by the delta library. All derive from :class:`DeltaError`."""

import torch


class DeltaError(Exception):
    """Base class for the library's errors."""


class ConfigError(DeltaError, ValueError):
    """A config has unknown keys, wrong types or out-of-range values."""


class UnknownMethodError(DeltaError, KeyError):
    """A method name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class TargetError(DeltaError, ValueError):
    """Targets matched no module of the backbone, or the architecture is unknown."""


class TaskError(DeltaError, KeyError):
    """A task name is unknown or already taken."""

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointError(DeltaError, ValueError):
    """A checkpoint is missing, corrupt, truncated or for another backbone."""


class BaseModelMismatch(CheckpointError):
    """A PEFT adapter records another base model's name. ``reason`` says so without a remedy: the
    check can be skipped (Python: ``strict_base=False``) where it is the same model under another
    name, and each caller names its own way to skip it."""

    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(f"{reason}; {remedy}")
        self.reason = reason


class BackboneError(DeltaError, RuntimeError):
    """A backbone could not be loaded."""


class NonFiniteError(DeltaError, ArithmeticError):
    """A model's outputs hold NaN or +inf: a score or an answer taken from them (an argmax of NaN
    is index 0) would be noise, so it is refused instead of reported.

    ``NonFiniteError(message, count)``: ``count`` (also ``args[1]``) is how many examples failed,
    for a caller that sums them over batches or processes; the message alone is what it prints."""

    @property
    def count(self) -> int | None:
        return self.args[1] if len(self.args) > 1 else None

    def __str__(self) -> str:  # not the (message, count) tuple an exception with two args prints
        return str(self.args[0]) if self.args else ""


def non_finite_rows(x: torch.Tensor, minus_inf: bool = True) -> torch.Tensor:
    """How many rows of ``x`` (the last dimension is a row) hold NaN or +inf, as a 0-d tensor on
    ``x``'s device (no host sync: a caller sums many and reads one). ``minus_inf``: -inf is a
    legal output (a label masked out of a softmax); embeddings pass False, as -inf is none."""
    ok = (x < float("inf")) if minus_inf else torch.isfinite(x)
    return (~ok.all(-1)).sum()


def refuse_non_finite(bad: int | torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteError` when ``bad`` (a count, e.g. a sum of :func:`non_finite_rows`)
    is not 0."""
    n = int(bad)
    if n:
        raise NonFiniteError(non_finite_message(where, n), n)


def non_finite_message(where: str, n: int) -> str:
    return (f"{where}: the outputs of {n} example(s) hold NaN or inf, so no score is reported from them "
            "(an argmax of NaN is label 0). In fp16 an activation can overflow: score in bf16 or fp32 "
            "(--precision); otherwise the delta's weights are not finite (a diverged or damaged delta)")
