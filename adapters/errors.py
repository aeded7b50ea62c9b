"""Exceptions raised by the delta library. All derive from :class:`DeltaError`."""


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


class BackboneError(DeltaError, RuntimeError):
    """A backbone could not be loaded."""


class NonFiniteError(DeltaError, ArithmeticError):
    """A model's outputs hold NaN or +inf: a score or an answer taken from them (an argmax of NaN
    is index 0) would be noise, so it is refused instead of reported."""


def non_finite_message(where: str, n: int) -> str:
    return (f"{where}: the outputs of {n} example(s) hold NaN or inf, so no score is reported from them "
            "(an argmax of NaN is label 0). In fp16 an activation can overflow: score in bf16 or fp32 "
            "(--precision); otherwise the delta's weights are not finite (a diverged or damaged delta)")
