"""Shareable task checkpoints: one task's delta and head, on their own.

A checkpoint is a directory with two files:
  delta.safetensors   the task's parameters (names relative to the task)
  delta.json          method configs, labels, head settings, the backbone's fingerprint, the
                      SHA-256 of the tensor file (so a truncated or corrupted copy is caught) and
                      of its own content (``checksum``: an edited or damaged file is refused)

Loading checks the fingerprint: a delta trained on another backbone is refused, not silently
applied to the wrong weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .errors import CheckpointError, DeltaError, TaskError
from .fingerprint import backbone_fingerprint, json_digest, output_dir, read_json, read_tensors, sha256_file
from .model import _TASK_NAME, DeltaModel

FORMAT = "delta-continual/task-checkpoint"
VERSION = 1
TENSORS, META = "delta.safetensors", "delta.json"


def save_task(model: DeltaModel, name: str, directory: str | Path) -> Path:
    """Write task ``name`` (delta + head) to ``directory``; returns the directory."""
    task = model.task(name)
    out = output_dir(directory, f"task {name!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in task.state_dict().items()}
    tmp = out / (TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out / TENSORS)  # atomic: a killed save never leaves a half-written file in place
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": name,
        "methods": [c.to_dict() for c in task.configs],
        "label_names": task.label_names,
        "num_labels": getattr(task.head, "num_labels", None),
        "pooling": getattr(task.head, "pooling", None),
        "generative": bool(getattr(task.head, "generative", False)),
        "frozen": task.frozen,
        "backbone": backbone_fingerprint(model.backbone),
        "backbone_name": model.backbone_name,
        "tensors_sha256": sha256_file(out / TENSORS),
    }
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps({**meta, "checksum": json_digest(meta)}, indent=2))
    tmp.replace(out / META)
    return out


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON side of a checkpoint, validated."""
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {path} does not exist")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a delta-continual task checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')}; this library reads version {VERSION}")
    # (checkpoints saved before checksums were recorded have none; their tensors are still checked)
    if "checksum" in meta and meta["checksum"] != json_digest(meta):
        raise CheckpointError(f"{path} does not match its checksum: the file was edited or damaged (its configs, "
                              "labels or head settings would load as something else); restore it from a copy")
    return meta


def _verified_meta(directory: Path, strict_backbone: bool, model: DeltaModel | None = None) -> dict[str, Any]:
    """A checkpoint's metadata, its tensor file's checksum verified and (``strict_backbone``) its
    backbone fingerprint compared with ``model``'s."""
    meta = read_meta(directory)
    tensors_path = directory / TENSORS
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path} is missing")
    if sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors_path} does not match its recorded checksum: the file is corrupt or truncated")
    if strict_backbone and model is not None:
        mine, theirs = backbone_fingerprint(model.backbone), meta.get("backbone", {})
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CheckpointError(
                f"checkpoint {directory} was saved for another backbone "
                f"({meta.get('backbone_name')!r}, {theirs.get('model_type')}); differs in {diff}. "
                "Load it onto the backbone it was trained with."
            )
    return meta


def load_task(model: DeltaModel, directory: str | Path, name: str | None = None, strict_backbone: bool = True) -> str:
    """Add the task saved in ``directory`` to ``model`` (as ``name``, default the saved name).

    Raises :class:`CheckpointError` for a missing, corrupt or truncated checkpoint, or one saved
    for another backbone. Returns the task name."""
    directory = Path(directory)
    if name is not None and (not isinstance(name, str) or not _TASK_NAME.match(name)):  # the caller's, not the file's
        raise TaskError(f"invalid task name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit")
    meta = _verified_meta(directory, strict_backbone, model)
    tensors = read_tensors(directory / TENSORS)
    task_name = name or meta["task"]
    if task_name in model.tasks:
        raise CheckpointError(f"the model already has a task {task_name!r}; load the checkpoint under another name")
    try:
        task = model.add_task(
            task_name, meta["methods"], num_labels=meta.get("num_labels"),
            label_names=meta.get("label_names"), pooling=meta.get("pooling"),
            generative=bool(meta.get("generative", False)),
        )
    except (DeltaError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory} has an invalid config: {e}") from None
    if meta.get("frozen"):
        for delta in task.deltas.values():
            delta.fold()  # give folded deltas the shapes they were saved with
    try:
        task.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        model.remove_task(task_name)
        raise CheckpointError(f"checkpoint {directory} does not fit its own config: {e}") from None
    if meta.get("frozen"):
        model.freeze(task_name)
    return task_name


def load_delta(model: DeltaModel, directory: str | Path, name: str, *, strict_backbone: bool = True, **head: Any) -> str:
    """Add a saved delta as task ``name`` with a new head (``head``: :meth:`DeltaModel.add_task`'s
    head arguments, e.g. ``label_names``): a PEFT adapter (``adapter_config.json``, see
    :mod:`adapters.peft_import`) or the delta of a task checkpoint (its own head is left out).
    Checks as :func:`load_task` and :func:`adapters.peft_import.import_peft` do."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from .peft_import import import_peft

        return import_peft(model, directory, name, strict_base=strict_backbone, **head)
    meta = _verified_meta(directory, strict_backbone, model)
    tensors = read_tensors(directory / TENSORS)
    deltas = {k: v for k, v in tensors.items() if k.startswith("deltas.")}
    try:
        task = model.add_task(name, meta["methods"], **head)
    except (DeltaError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory} has an invalid config: {e}") from None
    if meta.get("frozen"):
        for delta in task.deltas.values():
            delta.fold()
    try:
        task.deltas.load_state_dict({k[len("deltas."):]: v for k, v in deltas.items()}, strict=True)
    except RuntimeError as e:
        model.remove_task(name)
        raise CheckpointError(f"checkpoint {directory} does not fit its own config: {e}") from None
    return name
