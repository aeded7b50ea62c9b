"""What identifies a backbone and a file: a backbone's fingerprint, a file's SHA-256, a verified
read of a tensor file. Used by every saved form of a delta (task checkpoints, PEFT exports) to
refuse the wrong backbone or a damaged file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError


def backbone_fingerprint(backbone: nn.Module) -> dict[str, Any]:
    """Architecture facts plus a hash of a strided sample of every weight.

    Cheap (a few thousand values per tensor) yet different for any two real checkpoints. A
    backbone sharded across processes answers with the fingerprint taken before sharding."""
    cached = getattr(backbone, "_fingerprint_before_sharding", None)
    if cached is not None:
        return dict(cached)
    h = hashlib.sha256()
    for name, p in sorted(backbone.named_parameters()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    cfg = backbone.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "weights_sha256": h.hexdigest(),
    }


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or damaged file is a CheckpointError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def json_digest(data: dict[str, Any], skip: str = "checksum") -> str:
    """SHA-256 of ``data`` (its ``skip`` key left out) in one canonical JSON form: what a file that
    carries its own checksum records, so an edit or a damaged byte in it is caught on reading."""
    body = {k: v for k, v in data.items() if k != skip}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file's content; a corrupt or truncated one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from None


def output_dir(directory: str | Path, what: str) -> Path:
    """``directory``, made with its parents, to write ``what`` into; a file where a folder must go
    is a :class:`CheckpointError` naming it (``mkdir`` said only "File exists")."""
    out = Path(directory)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise CheckpointError(f"cannot write {what} to {out}: {p} is a file, not a directory")
            break
    out.mkdir(parents=True, exist_ok=True)
    return out
