"""Avalanche's continual-learning strategies as baselines on our backbone and streams.

    python -m continual run --strategy avalanche-ewc --strategy-option ewc_lambda=1000

Each ``avalanche-*`` strategy trains the whole backbone plus one head per task (task-incremental,
as ``seq-ft`` does) with the Avalanche strategy of that name: ``Naive`` (plain fine-tuning),
``EWC`` (online EWC), ``LwF``, ``Replay`` (experience-balanced reservoir memory) and ``AGEM``.
The continual-learning mechanism is Avalanche's own code; around it:

- the stream's tasks reach Avalanche as experiences of :mod:`continual.avalanche_export`;
- training follows our protocol (:class:`continual.avalanche_model.Protocol`: same steps,
  schedule, early stopping on dev and best-on-dev weights as every other method);
- scoring is ours: the runner fills the accuracy matrix with :func:`continual.train.evaluate`
  and logs to MLflow exactly as for our methods, so ACC/BWT/FWT/forgetting are comparable;
- resume works: the state saved after each task holds the backbone, the heads and each plugin's
  memory (EWC importances, replay and A-GEM buffers, LwF's seen classes), so a killed stream
  continues where it stopped and retraces the uninterrupted run.

Adding another Avalanche strategy is one subclass here (its class name, its default options and,
if its plugin remembers something between tasks, one entry in ``PLUGIN_STATE``).
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from adapters import DeltaModel
from adapters.model import MethodSpec
from adapters.speed import make_optimizer
from streams import Task

from .avalanche_export import require_avalanche, task_experience, tensor_dataset
from .strategies import SequentialFineTune
from .train import TrainConfig, TrainResult, eval_loader, evaluate, resolve_device

PREFIX = "avalanche-"


class AvalancheStrategy(SequentialFineTune):
    """Base class: an Avalanche ``SupervisedTemplate`` subclass driven one task at a time."""

    avalanche_class: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    updates_old_tasks = True  # old heads keep training (LwF distils them, EWC/replay/A-GEM touch them)

    def __init__(self, methods: Sequence[MethodSpec] = (), backbone_lr: float = 5e-5, **options: Any) -> None:
        super().__init__(methods, backbone_lr)
        require_avalanche()
        with warnings.catch_warnings():  # qpsolvers: "no QP solver found" (only GEM would need one)
            warnings.filterwarnings("ignore", message="no QP solver")
            import avalanche.training.supervised as supervised

        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {sorted(unknown)}; it takes {sorted(self.defaults)}")
        self.options = {**self.defaults, **options}
        self._cls = getattr(supervised, self.avalanche_class)
        self._avl: Any = None       # the Avalanche strategy, built at the first task trained in this process
        self._net: Any = None
        self._pending: dict[str, torch.Tensor] = {}  # plugin state loaded before the strategy exists
        self._done = 0               # experiences trained (Avalanche's clock), restored on resume

    # -- the runner's interface ----------------------------------------------------------------------
    def finish(self, model: DeltaModel, task: Task) -> None:
        """Nothing is frozen: Avalanche's strategies keep updating old heads (and the backbone)."""

    def train(self, model: DeltaModel, tasks: list[Task], config: TrainConfig, data: Callable[[Task], Any],
              callback: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        (task,) = tasks
        index = list(model.tasks).index(task.name)
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)  # A-GEM samples its memory with Python's RNG
        np.random.seed(config.seed % 2**32)
        splits = data(task)
        dev_loader = eval_loader(splits["dev"], model.tokenizer, config.max_length, config.batch_size * 2)
        # everything trains: the backbone and every head so far
        model.activate(*model.tasks)
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        bar = tqdm(total=config.max_steps, desc=f"train {task.name} ({self.name})", disable=not config.progress, leave=False)
        try:
            net = self._strategy(model, config, device)
            protocol = self._avl.plugins[0]
            protocol.start(config, [self.backbone_lr, config.head_lr], lambda: evaluate(model, task.name, dev_loader, (task.name,)), callback, bar)
            for plugin in self._avl.plugins:
                handler = PLUGIN_STATE.get(type(plugin).__name__)
                if handler is not None:
                    handler.rewind(plugin)
            experience = task_experience(splits["train"], index)
            self._avl.train_epochs = config.max_steps  # an upper bound: the protocol stops at max_steps
            start = time.perf_counter()
            self._avl.train(experience, eval_streams=[], reset_optimizer_state=True)
            seconds = time.perf_counter() - start
            self._done += 1
            net.eval()
        finally:
            bar.close()
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            model.deactivate()
        return TrainResult(protocol.best, protocol.best_step, protocol.step, seconds, protocol.history)

    def state(self, model: DeltaModel) -> dict[str, torch.Tensor]:
        out = super().state(model)
        out["avalanche.done"] = torch.tensor(self._done)
        if self._avl is not None:
            for plugin in self._avl.plugins:
                handler = PLUGIN_STATE.get(type(plugin).__name__)
                if handler is not None:
                    out.update({f"avalanche.{type(plugin).__name__}.{k}": v for k, v in handler.save(plugin).items()})
        else:
            out.update(self._pending)
        return out

    def load_state(self, model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
        super().load_state(model, state)
        self._done = int(state["avalanche.done"])
        self._pending = {k: v for k, v in state.items() if k.startswith("avalanche.") and k != "avalanche.done"}
        self._avl = None  # rebuilt, with this state, at the next task

    def trainable_parameters(self, model: DeltaModel, task: Task) -> int:
        return model.backbone_parameters() + sum(t.head_parameters() for t in model.tasks.values())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "avalanche": self.avalanche_class, "options": dict(self.options)}

    # -- building the Avalanche strategy -------------------------------------------------------------
    def _strategy(self, model: DeltaModel, config: TrainConfig, device: torch.device) -> Any:
        from avalanche.training.plugins import EvaluationPlugin

        from .avalanche_model import AvalancheNet, Protocol

        if self._avl is None:
            self._net = AvalancheNet(model.backbone)
        net = self._net
        net.sync(model)
        if self._avl is not None:
            return net
        groups = [{"params": list(net.backbone.parameters()), "lr": self.backbone_lr},
                  {"params": list(net.heads.parameters()), "lr": config.head_lr}]
        optimizer = make_optimizer(groups, device, config.weight_decay)
        with warnings.catch_warnings():  # we score with our own metrics: Avalanche's evaluator logs nothing
            warnings.filterwarnings("ignore", message="No loggers specified")
            evaluator = EvaluationPlugin(loggers=[])
        self._avl = self._cls(model=net, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                              train_mb_size=config.batch_size, eval_mb_size=config.batch_size * 2, train_epochs=1,
                              device=device, plugins=[Protocol()], evaluator=evaluator, eval_every=-1,
                              **self.options)
        # resumed: Avalanche's counters and the plugins' memories as they were after task _done
        self._avl.clock.train_exp_counter = self._done
        net.known_train_tasks_labels = set(range(self._done))
        for plugin in self._avl.plugins:
            name = type(plugin).__name__
            own = {k[len(f"avalanche.{name}."):]: v for k, v in self._pending.items() if k.startswith(f"avalanche.{name}.")}
            if name in PLUGIN_STATE and self._done:
                PLUGIN_STATE[name].load(plugin, own, net, device)
        self._pending = {}
        return net


# -- what each plugin remembers between tasks, as tensors (save, load, rewind) ---------------------
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


class AvalancheNaive(AvalancheStrategy):
    name = PREFIX + "naive"
    description = "Avalanche Naive: fine-tune backbone + heads on each task in turn (forgets)"
    avalanche_class = "Naive"


class AvalancheEWC(AvalancheStrategy):
    name = PREFIX + "ewc"
    description = "Avalanche EWC (online, Fisher summed over tasks): penalises moving important weights"
    avalanche_class = "EWC"
    defaults = {"ewc_lambda": 1000.0, "mode": "online", "decay_factor": 1.0}


class AvalancheLwF(AvalancheStrategy):
    name = PREFIX + "lwf"
    description = "Avalanche LwF: distils the previous model's old-task heads on new data"
    avalanche_class = "LwF"
    defaults = {"alpha": 1.0, "temperature": 2.0}


class AvalancheReplay(AvalancheStrategy):
    name = PREFIX + "replay"
    description = "Avalanche Replay: experience-balanced reservoir memory mixed into each batch"
    avalanche_class = "Replay"
    defaults = {"mem_size": 200}


class AvalancheAGEM(AvalancheStrategy):
    name = PREFIX + "agem"
    description = "Avalanche A-GEM: projects gradients that would raise the loss on a memory sample"
    avalanche_class = "AGEM"
    defaults = {"patterns_per_exp": 100, "sample_size": 64}


AVALANCHE_STRATEGIES = (AvalancheNaive, AvalancheEWC, AvalancheLwF, AvalancheReplay, AvalancheAGEM)
