"""``continual export``: a finished (or partly finished) run's task deltas as HuggingFace PEFT
adapters, one directory per task, for PEFT, vLLM, TGI or LoRAX to load.

The run directory stays the source of truth (its checkpoints are verified against the manifest
as they load); an export is a view of it, written by :func:`adapters.export_peft`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from adapters import ConfigError, export_peft, read_meta
from adapters.peft_export import VLLM_MAX_RANKS, exportable, max_rank, vllm_problems, vllm_scaling

from .loadrun import load_run_model, run_tasks
from .rundir import BACKBONE_FILE, check_out


@dataclasses.dataclass
class Exported:
    """One task's adapter: where it went, its PEFT config, and what keeps vLLM from serving it."""

    task: str
    directory: Path
    config: dict[str, Any]
    vllm: list[str]


def export_run(run: str | Path, out: str | Path, backbone: str | None = None, tasks: Sequence[str] | None = None,
               base_model: str | None = None, max_lora_rank: int = 16) -> tuple[list[Exported], dict[str, str]]:
    """Export each task of ``run`` (default: every task whose delta PEFT can hold) into
    ``out/<task>``; returns the exports and, for each task left out, why. A task named in
    ``tasks`` that cannot be exported is an error naming why; so is a run with none that can."""
    _check_out(Path(out), run_tasks(run, tasks), Path(run))  # before the backbone loads
    if (Path(run) / "checkpoints" / BACKBONE_FILE).exists():
        raise ConfigError(f"{run} fine-tuned its whole backbone (seq-ft, avalanche-*): it holds no delta to export "
                          f"as an adapter, only task heads over that backbone ({Path(run) / 'checkpoints' / BACKBONE_FILE})")
    model, added = load_run_model(run, backbone, tasks)
    reasons = {name: exportable(model.task(name).configs, model, list(model.task(name).deltas.values())) for name in added}
    if tasks is not None:
        bad = {t: reasons[t] for t in added if reasons[t] and model.task(t).configs}  # a head alone is listed, not an error
        if bad:
            raise ConfigError("; ".join(f"task {t!r}: {why}" for t, why in bad.items()))
    chosen = [t for t in added if not reasons[t]]
    if not chosen:
        raise ConfigError(f"no task of {run} can be exported to PEFT: "
                          + "; ".join(f"{', '.join(ts)}: {w}" for ts, w in by_reason(reasons)))
    done = []
    lm = any(getattr(model.task(n).head, "generative", False) for n in added)  # a shared delta serves these
    for name in chosen:
        directory = export_peft(model, name, Path(out) / name, base_model, generative=lm)
        config = json.loads((directory / "adapter_config.json").read_text())
        done.append(Exported(name, directory, config, vllm_problems(config, max_lora_rank)))
    return done, {t: why for t, why in reasons.items() if why}


def by_reason(reasons: dict[str, str]) -> list[tuple[list[str], str]]:
    """The tasks left out grouped by why, in the run's order: a run of one method gives each task the
    same reason, which said once over the task names reads where six copies of it did not."""
    groups: dict[str, list[str]] = {}
    for task, why in reasons.items():
        if why:
            groups.setdefault(why, []).append(task)
    return [(tasks, why) for why, tasks in groups.items()]


def _check_out(out: Path, tasks: Sequence[str], run: Path) -> None:
    """Refuse an ``out`` that cannot take ``out/<task>`` folders: a file, or a file where a
    task's folder would go (each export is written into its folder, replacing what is there),
    and one inside the run's checkpoints, which hold what the run's manifest verifies."""
    check_out(out, "the adapters")
    store = (run / "checkpoints").resolve()
    if out.resolve() == store or store in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the run's checkpoints ({run / 'checkpoints'}), which only the run "
                          f"writes; give a folder outside it (e.g. {run / 'peft'} or peft/)")
    clash = [t for t in tasks if (out / t).exists() and not (out / t).is_dir()]
    if clash:
        raise ConfigError(f"--out {out} holds files where the adapters' folders would go: {[str(out / t) for t in clash]}")


def serving_recipe(exported: Sequence[Exported], max_lora_rank: int = 16) -> list[str]:
    """The commands that serve the servable adapters (vLLM and TGI), as text."""
    ok = [e for e in exported if not e.vllm]
    if not ok:
        return []
    base = ok[0].config.get("base_model_name_or_path")
    top = max(max_lora_rank, *(max_rank(e.config) for e in ok))
    rank = next((m for m in VLLM_MAX_RANKS if m >= top), top)  # a value vLLM's --max-lora-rank takes
    modules = " ".join(f"{e.task}={e.directory.resolve()}" for e in ok)
    return [f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {modules}",
            f"LORA_ADAPTERS={','.join(f'{e.task}={e.directory.resolve()}' for e in ok)} text-generation-launcher --model-id {base}",
            "scaling as vLLM computes it: " + ", ".join(f"{e.task} {vllm_scaling(e.config):g}" + (
                " (rank_pattern / alpha_pattern set some modules' own)" if e.config.get("rank_pattern") or
                e.config.get("alpha_pattern") else "") for e in ok)]
