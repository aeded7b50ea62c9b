"""Avalanche's continual-learning strategies as baselines on our backbone and streams.

    python -m continual run --strategy avalanche-ewc --strategy-option ewc_lambda=1000

Each ``avalanche-*`` strategy trains the whole backbone plus one head per task (task-incremental,
as ``seq-ft`` does) with the Avalanche strategy of that name: ``Naive`` (plain fine-tuning),
``EWC`` (online EWC), ``LwF``, ``Replay`` (experience-balanced reservoir memory) and ``AGEM``.
The continual-learning mechanism is Avalanche's own code; around it:

- the stream's tasks reach Avalanche as experiences of :mod:`.export`;
- training follows our protocol (:class:`continual.training.Protocol`, driven by the plugin of
  :mod:`.model`: same steps, schedule, early stopping on dev and best-on-dev weights as every
  other method);
- scoring is ours: the scheduler fills the accuracy matrix with :func:`continual.training.evaluate`
  and logs to MLflow exactly as for our methods, so ACC/BWT/FWT/forgetting are comparable;
- resume works: the state saved after each task holds the backbone, the heads and each plugin's
  memory (EWC importances, replay and A-GEM buffers, LwF's seen classes), so a killed stream
  continues where it stopped and retraces the uninterrupted run.

Adding another Avalanche strategy is one subclass here (its class name, its default options and,
if its plugin remembers something between tasks, one entry in :data:`.memory.PLUGIN_STATE`).
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from adapters import DeltaModel
from adapters.model import MethodSpec
from streams import Task

from ...training import Protocol, TrainConfig, TrainResult, eval_loader, evaluate, make_optimizer
from ..base import TaskData, check_option, finite_at_least
from ..finetune import SequentialFineTune
from .export import require_avalanche, task_experience
from .memory import PLUGIN_STATE

PREFIX = "avalanche-"


class AvalancheStrategy(SequentialFineTune):
    """Base class: an Avalanche ``SupervisedTemplate`` subclass driven one task at a time."""

    avalanche_class: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    updates_old_tasks = True  # old heads keep training (LwF distils them, EWC/replay/A-GEM touch them)

    generative_tasks = False  # its model wrapper returns one head's class logits
    data_parallel = False  # Avalanche's own training loop, not continual.training.fit
    own_loop = True

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
        self._check_options(options)
        self._cls = getattr(supervised, self.avalanche_class)
        self._avl: Any = None       # the Avalanche strategy, built at the first task trained in this process
        self._net: Any = None
        self._pending: dict[str, torch.Tensor] = {}  # plugin state loaded before the strategy exists
        self._done = 0               # experiences trained (Avalanche's clock), restored on resume

    def _check_options(self, given: dict[str, Any]) -> None:
        """Refuse option values Avalanche would take and then fail on mid-run (an empty memory, a
        zero batch) or train with silently (a negative penalty weight, a zero temperature)."""
        for key, (ok, what, integer) in self.checks.items():
            check_option(self.name, key, self.options[key], ok, what, integer)

    #: option -> (test, what it must be, integer only), checked when the strategy is made
    checks: ClassVar[dict[str, tuple[Callable[[Any], bool], str, bool]]] = {}

    # -- the runner's interface ----------------------------------------------------------------------
    def finish(self, model: DeltaModel, task: Task) -> None:
        """Nothing is frozen: Avalanche's strategies keep updating old heads (and the backbone)."""

    def train(self, model: DeltaModel, tasks: list[Task], config: TrainConfig, data: TaskData,
              callback: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        (task,) = tasks
        index = list(model.tasks).index(task.name)
        torch.manual_seed(config.seed)
        random.seed(config.seed)  # A-GEM samples its memory with Python's RNG
        np.random.seed(config.seed % 2**32)
        splits = data(task)
        dev_loader = eval_loader(splits["dev"], model.tokenizer, config.max_length, config.batch_size * 2)
        # everything trains: the backbone and every head so far
        model.activate(*model.tasks)
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        try:
            net = self._strategy(model, config, model.device)
            # the optimizer lives across tasks (its rates end decayed): give the peak rates again
            protocol = Protocol(config, [p for p in net.parameters() if p.requires_grad], self._avl.optimizer,
                                lambda: evaluate(model, task.name, dev_loader, (task.name,)), callback,
                                f"train {task.name} ({self.name})", base_lrs=[self.backbone_lr, config.head_lr])
            driver = self._avl.plugins[0]
            driver.start(protocol)
            for plugin in self._avl.plugins:
                handler = PLUGIN_STATE.get(type(plugin).__name__)
                if handler is not None:
                    handler.rewind(plugin)
            experience = task_experience(splits["train"], index)
            self._avl.train_epochs = config.max_steps  # an upper bound: the protocol stops at max_steps
            self._avl.train(experience, eval_streams=[], reset_optimizer_state=True)
            self._done += 1
            net.eval()
        finally:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            model.deactivate()
        return driver.result

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

        from .model import AvalancheNet, ProtocolPlugin

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
                              device=device, plugins=[ProtocolPlugin()], evaluator=evaluator, eval_every=-1,
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


class AvalancheNaive(AvalancheStrategy):
    name = PREFIX + "naive"
    description = "Avalanche Naive: fine-tune backbone + heads on each task in turn (forgets)"
    avalanche_class = "Naive"


class AvalancheEWC(AvalancheStrategy):
    name = PREFIX + "ewc"
    description = "Avalanche EWC (online, Fisher summed over tasks): penalises moving important weights"
    avalanche_class = "EWC"
    defaults = {"ewc_lambda": 1000.0, "mode": "online", "decay_factor": 1.0}
    # decay_factor: online EWC's gamma, which keeps a share of the old importance (Schwarz et al.
    # 2018, "Progress & Compress"), in [0, 1]; Avalanche itself takes any number
    checks = {"ewc_lambda": (finite_at_least(0), "a finite number >= 0", False),
              "decay_factor": (lambda v: 0 <= v <= 1, "a number in [0, 1]", False)}

    def _check_options(self, given: dict[str, Any]) -> None:
        mode = self.options["mode"]
        if mode not in ("online", "separate"):
            raise ValueError(f"{self.name}: mode must be 'online' or 'separate', got {mode!r}")
        if mode == "separate":  # one penalty per task, no decay: Avalanche refuses a decay_factor there
            if "decay_factor" in given:
                raise ValueError(f"{self.name}: decay_factor applies to mode=online only")
            self.options["decay_factor"] = None
            check_option(self.name, "ewc_lambda", self.options["ewc_lambda"], finite_at_least(0), "a finite number >= 0")
            return
        super()._check_options(given)


class AvalancheLwF(AvalancheStrategy):
    name = PREFIX + "lwf"
    description = "Avalanche LwF: distils the previous model's old-task heads on new data"
    avalanche_class = "LwF"
    defaults = {"alpha": 1.0, "temperature": 2.0}
    checks = {"alpha": (finite_at_least(0), "a finite number >= 0", False),
              "temperature": (finite_at_least(1e-6), "a finite number >= 1e-06", False)}


class AvalancheReplay(AvalancheStrategy):
    name = PREFIX + "replay"
    description = "Avalanche Replay: experience-balanced reservoir memory mixed into each batch"
    avalanche_class = "Replay"
    defaults = {"mem_size": 200}
    checks = {"mem_size": (lambda v: v >= 1, "an integer >= 1", True)}


class AvalancheAGEM(AvalancheStrategy):
    name = PREFIX + "agem"
    description = "Avalanche A-GEM: projects gradients that would raise the loss on a memory sample"
    avalanche_class = "AGEM"
    defaults = {"patterns_per_exp": 100, "sample_size": 64}
    checks = {"patterns_per_exp": (lambda v: v >= 1, "an integer >= 1", True),
              "sample_size": (lambda v: v >= 1, "an integer >= 1", True)}

    def check_stream(self, stream: Any, model: DeltaModel, max_length: int | None = None) -> None:
        # each step samples sample_size // (tasks so far) memory examples per earlier task: zero
        # (a DataLoader error at that task) once the earlier tasks outnumber the sample
        if self.options["sample_size"] < len(stream) - 1:
            raise ValueError(f"{self.name}: sample_size {self.options['sample_size']} is smaller than the "
                             f"{len(stream) - 1} earlier tasks of a {len(stream)}-task stream; use at least {len(stream) - 1}")
        super().check_stream(stream, model, max_length)


AVALANCHE_STRATEGIES = (AvalancheNaive, AvalancheEWC, AvalancheLwF, AvalancheReplay, AvalancheAGEM)
