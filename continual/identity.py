"""A run's identity: what must be equal for a saved run to be resumed or reused, how a saved
run differs from the one asked for, and opening a run folder to start or continue in."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adapters import DeltaModel, backbone_fingerprint
from streams import TaskStream

from . import rundir
from .rundir import RunState, RunStateError
from .strategies import Strategy
from .training import TrainConfig


def run_identity(stream: TaskStream, model: DeltaModel, strategy: Strategy, config: TrainConfig) -> dict[str, Any]:
    """What must be equal for a saved run to be resumed: the recipe (never the runtime: a run may
    continue on another device, precision or batching), the stream, its data, the strategy and the
    backbone's weights."""
    train = {k: v for k, v in dataclasses.asdict(config.recipe()).items() if k != "seed"}
    return {"stream": stream.name, "tasks": stream.names, "data": stream.fingerprints(), "strategy": strategy.describe(),
            "train": train, "seed": config.seed, "backbone": backbone_fingerprint(model.backbone)["weights_sha256"]}


def open_run(out: Path, identity: dict[str, Any], steps: int, resume: bool, overwrite: bool) -> RunState | None:
    """The saved state to continue, or None to start afresh; refuses a run that does not match."""
    state_path = out / "state.json"
    if not state_path.exists():
        # a run writes state.json before anything else: these names without it are not a run of
        # ours (a user's files, or a run whose state was removed), and a new run would replace them
        theirs = [n for n in rundir.RUN_FILES if (out / n).exists()]
        if theirs:
            raise RunStateError(f"{out} holds {', '.join(theirs)} but no state.json, so no run this tool can resume "
                                "or replace; a run there would overwrite them. Give another --out, or move them away")
        return None
    if overwrite and not resume:
        rundir.clear_run(out)
        return None
    state = rundir.read_state(state_path)
    if not resume:
        # "steps" alone read as --steps (training steps): these are the stream's, one per task
        raise RunStateError(f"{out} already holds a run ({len(state.done)}/{steps} stream steps done: tasks trained, "
                            "or all at once for joint): resume it (--resume) or start again (--overwrite)")
    diff = identity_differences(state.identity, identity)
    if diff:
        raise RunStateError(f"{out} holds a different run (differs in: {'; '.join(diff)}); use another output "
                            "directory, or replace it (continual run --overwrite; else delete the folder)")
    return state


def identity_differences(saved: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """Where a saved run's :func:`run_identity` differs from the one asked for, down to the setting
    (``train.lr: 0.01 there, 0.001 now``; empty: the same run, which may be resumed or reused).
    Named to the leaf because "differs in: train" left a user to find which of a dozen settings;
    at most three per part (another method differs in most of its fields)."""
    out = []
    for key in sorted(identity):
        found = _differences(key, saved.get(key), identity[key])
        out += found[:3] + ([f"{len(found) - 3} more in {key}"] if len(found) > 3 else [])
    return out


def _differences(path: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    kind = next((k for k in ("method", "strategy") if isinstance(old, dict) and k in old), None)
    if kind and isinstance(new, dict) and old[kind] != new.get(kind):  # another method: its fields all differ
        return [f"{path}.{kind}: {_short(old[kind])} there, {_short(new.get(kind))} now"]
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) for d in _differences(f"{path}.{k}", old.get(k), new.get(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(f"{path}[{i}]", a, b)]
    return [f"{path}: {_short(old)} there, {_short(new)} now"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + "..."  # a weights hash, a list of tasks
