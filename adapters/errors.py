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
