"""Parameter-efficient delta modules on a frozen pre-trained transformer.

Public API:
  DeltaModel                  frozen backbone + named task deltas and heads
  available_methods, get_method, make_config, register
  save_task, load_task        shareable per-task checkpoints; load_delta: a saved delta with a new head
  export_peft, import_peft    HuggingFace PEFT adapters, both ways (DeltaModel.export_peft / import_peft)
  load_backbone               offline-first backbone loading
  MixedTasks (model.mixed())  many tasks in one batch, each example through its own delta
"""

# first: torchvision must be importable before transformers is (see torchvision_compat)
from .torchvision_compat import ensure_importable as _ensure_torchvision

_ensure_torchvision()

from .backbones import BACKBONES, DEFAULT_BACKBONE, load_backbone
from .base import Delta, LayerwiseConfig, SiteDelta
from .checkpoint import backbone_fingerprint, load_delta, load_task, read_meta, save_task
from .peft_export import export_peft
from .peft_import import import_peft
from .config import DeltaConfig
from .errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DeltaError,
    NonFiniteError,
    TargetError,
    TaskError,
    UnknownMethodError,
)
from .mixed import MixedTasks
from .model import DeltaModel, TaskDelta
from .registry import DEFAULT_HEAD_LR, DEFAULT_METHOD, available_methods, get_method, make_config, register
from .targets import ARCHITECTURES, ArchSpec, register_architecture

__all__ = [
    "DEFAULT_HEAD_LR", "DEFAULT_METHOD",
    "ARCHITECTURES", "ArchSpec", "BACKBONES", "BackboneError", "CheckpointError", "ConfigError",
    "DEFAULT_BACKBONE", "Delta", "DeltaConfig", "DeltaError", "DeltaModel", "LayerwiseConfig", "MixedTasks", "NonFiniteError",
    "SiteDelta", "TargetError", "TaskDelta", "TaskError", "UnknownMethodError", "available_methods",
    "backbone_fingerprint", "export_peft", "get_method", "import_peft", "load_delta", "load_backbone", "load_task", "make_config", "read_meta",
    "register", "register_architecture", "save_task",
]
