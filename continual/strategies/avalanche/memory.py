"""What each Avalanche plugin remembers between tasks, as tensors (save, load, rewind), so a killed
stream resumes with the memories an uninterrupted one would have: EWC's importances, replay and
A-GEM buffers, LwF's seen classes (its teacher is the model as loaded).

Adding a stateful plugin is one :class:`PluginState` entry in :data:`PLUGIN_STATE`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple

import torch

from .export import tensor_dataset


def _dataset_tensors(data: Any) -> dict[str, torch.Tensor]:
    rows = [data[i] for i in range(len(data))]
    return {"x": torch.stack([r[0] for r in rows]), "y": torch.tensor([int(r[1]) for r in rows]),
            "t": torch.tensor([int(r[-1]) for r in rows])}


def _grouped(state: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        group, _, field = key.partition(".")
        if group.isdigit():
            out.setdefault(int(group), {})[field] = v
    return dict(sorted(out.items()))


def _ewc_save(p: Any) -> dict[str, torch.Tensor]:
    out = {}
    for kind, table in (("saved", p.saved_params), ("imp", p.importances)):
        for exp, params in table.items():
            out.update({f"{kind}.{exp}.{name}": d.data for name, d in params.items()})
    return out


def _ewc_load(p: Any, state: dict[str, torch.Tensor], net: Any, device: torch.device) -> None:
    from avalanche.training.utils import ParamData

    # EWC pairs importances with parameters by position: keep the model's parameter order (the
    # saved file's keys come back sorted)
    order = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    for key, v in sorted(state.items(), key=lambda kv: order[kv[0].split(".", 2)[2]]):
        kind, exp, name = key.split(".", 2)
        table = p.saved_params if kind == "saved" else p.importances
        table[int(exp)][name] = ParamData(name, init_tensor=v.to(device), device=device)


def _lwf_save(p: Any) -> dict[str, torch.Tensor]:
    out = {"expcount": torch.tensor(p.lwf.expcount)}
    out.update({f"classes.{t}": torch.tensor(sorted(c)) for t, c in p.lwf.prev_classes_by_task.items()})
    return out


def _lwf_load(p: Any, state: dict[str, torch.Tensor], net: Any, device: torch.device) -> None:
    p.lwf.expcount = int(state["expcount"])
    for key, v in state.items():
        if key.startswith("classes."):
            p.lwf.prev_classes_by_task[int(key.split(".")[1])] = set(v.tolist())
    p.lwf.prev_model = copy.deepcopy(net)  # the teacher: the model after the last task, as just loaded
    p.lwf.prev_model.train()  # as Avalanche leaves it (copied inside the training loop): dropout on


def _replay_save(p: Any) -> dict[str, torch.Tensor]:
    policy = p.storage_policy
    out = {"num_exps": torch.tensor(policy._num_exps)}
    for g, buf in policy.buffer_groups.items():
        out[f"{g}.max_size"] = torch.tensor(buf.max_size)
        out[f"{g}.weights"] = buf._buffer_weights
        out.update({f"{g}.{k}": v for k, v in _dataset_tensors(buf.buffer).items()})
    return out


def _replay_load(p: Any, state: dict[str, torch.Tensor], net: Any, device: torch.device) -> None:
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    policy = p.storage_policy
    policy._num_exps = int(state["num_exps"])
    for g, s in _grouped(state).items():
        buf = ReservoirSamplingBuffer(int(s["max_size"]))
        buf._buffer_weights = s["weights"]
        buf.buffer = tensor_dataset(s["x"], s["y"], s["t"].tolist())
        policy.buffer_groups[g] = buf


def _agem_save(p: Any) -> dict[str, torch.Tensor]:
    out = {}
    for i, data in enumerate(p.buffers):
        out.update({f"{i}.{k}": v for k, v in _dataset_tensors(data).items()})
    return out


def _agem_load(p: Any, state: dict[str, torch.Tensor], net: Any, device: torch.device) -> None:
    p.buffers = [tensor_dataset(s["x"], s["y"], s["t"].tolist()) for s in _grouped(state).values()]
    if p.buffers:
        from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

        p.buffer_dataloader = GroupBalancedInfiniteDataLoader(p.buffers, batch_size=p.sample_size // len(p.buffers))


def _agem_rewind(p: Any) -> None:
    # A fresh memory iterator at the start of each task, after the task's seed is set: an
    # uninterrupted and a resumed run then draw the same memory batches.
    if p.buffers:
        p.buffer_dliter = iter(p.buffer_dataloader)


def _nothing(p: Any) -> None:
    pass


class PluginState(NamedTuple):
    """How a plugin's memory between tasks becomes tensors and back, and what to reset before a task."""

    save: Callable[[Any], dict[str, torch.Tensor]]
    load: Callable[[Any, dict[str, torch.Tensor], Any, torch.device], None]
    rewind: Callable[[Any], None] = _nothing


PLUGIN_STATE: dict[str, PluginState] = {
    "EWCPlugin": PluginState(_ewc_save, _ewc_load),
    "LwFPlugin": PluginState(_lwf_save, _lwf_load),
    "ReplayPlugin": PluginState(_replay_save, _replay_load),
    "AGEMPlugin": PluginState(_agem_save, _agem_load, _agem_rewind),
}


