"""Loading a finished (or partly finished) run: its tasks' checkpoints, verified against the run's
manifest, onto the backbone it was trained on (as the run left it, for a strategy that fine-tuned
it). What ``continual route``, ``transfer``, ``merge`` and ``export`` start from."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file

from adapters import DeltaModel, load_task, read_meta
from adapters.fingerprint import backbone_fingerprint

from .rundir import BACKBONE_FILE, RunStateError, check_present, not_a_run, run_info, verify


def run_tasks(run_dir: str | Path, tasks: Sequence[str] | None = None) -> list[str]:
    """The tasks :func:`load_run_tasks` would load (``tasks``, checked, or all in stream order),
    read from the folder alone: a wrong name is an error before any backbone is loaded."""
    run = Path(run_dir)
    root = run / "checkpoints"
    if not root.is_dir():
        raise RunStateError(not_a_run(run, "has no checkpoints/ folder: is it a stream's output directory?"))
    info = run_info(run)
    # a task's folder deleted after the run was passed over as "not trained yet": routed, transferred
    # and exported without it, or refused as not a per-task run
    check_present(run, [f for f in info.get("files", {}) if f.startswith("checkpoints/")])
    order = info.get("matrix", {}).get("tasks", [])
    saved = [t for t in order if (root / t).is_dir()] or sorted(p.name for p in root.iterdir() if p.is_dir())
    wanted = list(tasks) if tasks is not None else saved
    twice = sorted({t for t in wanted if wanted.count(t) > 1})
    if twice:
        raise RunStateError(f"tasks {twice} are named more than once; name each task once")
    missing = [t for t in wanted if t not in saved]
    if missing:
        raise RunStateError(f"{run} has no checkpoints for {missing}; it has: {saved}")
    return wanted


def _load_names(saved: dict[str, list[Path]]) -> dict[Path, str | None]:
    """The name each checkpoint folder loads as: ``<task>-<name>`` where several stream tasks saved
    one name (a shared delta after each task), else None (its own)."""
    names = [d.name for dirs in saved.values() for d in dirs]
    return {d: f"{t}-{d.name}" if names.count(d.name) > 1 else None for t, dirs in saved.items() for d in dirs}


def run_task_names(run_dir: str | Path) -> list[str]:
    """The names :func:`load_run_tasks` gives the model tasks it adds for every stream task (in
    folder order), read from the folder alone."""
    return [name or d.name for d, name in _load_names(_checkpoints(Path(run_dir))).items()]


def load_run_tasks(model: DeltaModel, run_dir: str | Path, tasks: Sequence[str] | None = None) -> list[str]:
    """Load the task checkpoints a finished (or partly finished) stream saved into ``model``.
    ``tasks``: the stream tasks to load (default: every task that has checkpoints), in stream
    order; each task's checkpoints (its delta, and e.g. its fusion) load in the order saved. A
    shared delta is saved after every task (seq-delta, replay, ...): each of those states loads
    as ``<task>-<name>``, the delta as it was after that task. Returns the model tasks added."""
    run, wanted = Path(run_dir), run_tasks(run_dir, tasks)
    files, saved = run_info(run).get("files", {}), _checkpoints(run)
    names = _load_names(saved)
    strict = not _on_fine_tuned_backbone(run, model, [d for dirs in saved.values() for d in dirs])
    added = []
    for t in wanted:
        for f in (f for d in saved[t] for f in sorted(d.iterdir())):
            verify(run, files, f)
        # a task's own delta before anything built over other tasks (a fusion names its sources)
        dirs = sorted(saved[t], key=lambda p: any(m.get("sources") for m in read_meta(p)["methods"]))
        added += [load_task(model, d, names[d], strict) for d in dirs]
    return added


def _on_fine_tuned_backbone(run: Path, model: DeltaModel, saved: Sequence[Path]) -> bool:
    """True when the run fine-tuned its backbone and ``model`` holds it as the run left it. Such a
    strategy (seq-ft, avalanche-*) saves each task's head against the backbone of that moment,
    and all of them run on the last one, which the latest checkpoint names: the heads then load
    without their own backbone check. A model with another backbone is refused with the reason."""
    if not (run / "checkpoints" / BACKBONE_FILE).exists() or not saved:
        return False
    if backbone_fingerprint(model.backbone) != read_meta(saved[-1]).get("backbone"):
        raise RunStateError(f"{run} fine-tuned its backbone: its tasks run on the backbone as the run left it "
                            f"({run / 'checkpoints' / BACKBONE_FILE}); load_run_model({str(run)!r}) loads it")
    return True


def _checkpoints(run: Path) -> dict[str, list[Path]]:
    """Each stream task's checkpoint folders (those holding a delta.json), in stream order."""
    return {t: [p for p in sorted((run / "checkpoints" / t).iterdir()) if (p / "delta.json").exists()] for t in run_tasks(run)}


def run_backbone(run_dir: str | Path) -> str:
    """The backbone a run's checkpoints were saved from (the name it was loaded by)."""
    dirs = [d for saved in _checkpoints(Path(run_dir)).values() for d in saved]
    if not dirs:
        raise RunStateError(f"{run_dir} has no task checkpoints (checkpoints/<task>/<name>/delta.json)")
    return read_meta(dirs[0])["backbone_name"]


def load_run_model(run_dir: str | Path, backbone: str | None = None, tasks: Sequence[str] | None = None) -> tuple[DeltaModel, list[str]]:
    """The backbone a run was trained on (``backbone``, default: the one its checkpoints name; as
    the run left it, if it fine-tuned it), with the run's task checkpoints loaded (see
    :func:`load_run_tasks`). Weights the backbone's files lack (an unused pooler) are the run's:
    :func:`adapters.load_backbone` draws them from a fixed seed."""
    run, info = Path(run_dir), run_info(run_dir)
    run_tasks(run, tasks)  # a wrong task name is an error before the backbone loads
    model = DeltaModel.from_pretrained(backbone or run_backbone(run))
    trained = run / "checkpoints" / BACKBONE_FILE
    if trained.exists():  # a strategy that fine-tuned the backbone (seq-ft, avalanche-*)
        verify(run, info.get("files", {}), trained)
        model.backbone.load_state_dict(load_file(str(trained)), strict=True)
    return model, load_run_tasks(model, run, tasks)
