"""DeltaModel: one frozen backbone, many named task deltas, each with its own head.

    model = DeltaModel.from_pretrained()                 # MiniLM, offline
    model.add_task("movies", ["bottleneck", "bitfit"], label_names=["neg", "pos"])
    model.activate("movies")                              # only its parameters are trainable
    logits = model(**batch)
    with model.disabled():                                # backbone alone (+ the task's head)
        ...
    model.freeze("movies")                                # trained: never trainable again

A task's delta is a list of method configs applied together (a combination); each method is a
:class:`~adapters.base.Delta` hooked into the backbone, acting only while its task is active.
"""

from __future__ import annotations

import contextlib
import re
from functools import partial
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .base import DECODER_REFUSAL, Delta
from .config import DeltaConfig
from .errors import ConfigError, TaskError
from .heads import ClassificationHead, LMHead
from .inputs import check_positions, checked_batch, position_table
from .mixed import MixedTasks
from .registry import DEFAULT_HEAD_LR, DEFAULT_METHOD, get_method
from .spec import method_configs
from .targets import arch_spec

MethodSpec = str | dict[str, Any] | DeltaConfig

_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class TaskDelta(nn.Module):
    """The deltas (keyed by method name) and the head of one task."""

    def __init__(
        self,
        name: str,
        configs: Sequence[DeltaConfig],
        model: "DeltaModel",
        head: ClassificationHead | LMHead | None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not configs and head is None:
            raise ConfigError(f"task {name!r}: give at least one delta method, or labels for a head-only task")
        self.name = name
        self.configs = tuple(configs)
        self.deltas = nn.ModuleDict()
        for i, config in enumerate(self.configs):
            key = config.method if config.method not in self.deltas else f"{config.method}_{i}"
            method = get_method(config.method)
            if not method.capabilities.decoders and model.spec.kind == "decoder":  # by its declaration, for every method
                raise ConfigError(DECODER_REFUSAL.format(method=config.method, backbone=getattr(model, "backbone_name", "")))
            self.deltas[key] = method.create(config, model)
        self.head = head
        self.label_names = list(label_names) if label_names is not None else None
        self.frozen = False
        self.delta_frozen = False  # True: only the head trains (a merged delta, a probe)
        # parameters (names relative to this task) a strategy keeps fixed while the rest trains,
        # e.g. InfLoRA's designed down-projection
        self.held: frozenset[str] = frozenset()

    def delta_parameters(self) -> int:
        return sum(d.num_parameters() for d in self.deltas.values())

    def head_parameters(self) -> int:
        return 0 if self.head is None else sum(p.numel() for p in self.head.parameters())

    def param_groups(self, lr: float | None = None, head_lr: float = DEFAULT_HEAD_LR) -> list[dict[str, Any]]:
        """Optimizer groups: each method at its own default learning rate unless ``lr`` is given."""
        groups = [
            {"params": [p for p in d.parameters() if p.requires_grad], "lr": lr or d.config.default_lr, "name": key}
            for key, d in self.deltas.items()
        ]
        if self.head is not None:
            groups.append({"params": [p for p in self.head.parameters() if p.requires_grad], "lr": head_lr, "name": "head"})
        return [g for g in groups if g["params"]]


class DeltaModel(nn.Module):
    """A frozen pre-trained transformer carrying named, coexisting task deltas."""

    def __init__(self, backbone: nn.Module, tokenizer: Any = None, backbone_name: str | None = None) -> None:
        super().__init__()
        base = getattr(backbone, "base_model", backbone)
        self.spec = arch_spec(base)  # fails early, with the supported list, for unknown models
        self.backbone = base
        # A causal LM's (or T5's) own output layer, often tied to the input embeddings: generative
        # tasks read it through their LMHead; None for an encoder or a decoder loaded without it.
        # (T5ForConditionalGeneration is its own base model: the whole of it is the backbone.)
        self.seq2seq = self.spec.kind == "encoder-decoder"
        with_head = backbone is not base or self.seq2seq
        self.lm_head = backbone.get_output_embeddings() if with_head else None
        self.max_positions = position_table(base)  # None: relative or rotary positions, no table to overflow
        self.requires_grad_(False)
        self.tasks = nn.ModuleDict()
        self.tokenizer = tokenizer
        self.backbone_name = backbone_name or getattr(base.config, "_name_or_path", "") or base.config.model_type
        self._active: tuple[str, ...] = ()
        self._head: str | None = None  # the task whose head gives the logits
        self.train(base.training)  # a backbone loaded for inference stays in eval mode

    @classmethod
    def from_pretrained(cls, name: str = "minilm", **kwargs: Any) -> "DeltaModel":
        """Load a backbone by short name or path (see :mod:`adapters.backbones`) and wrap it."""
        from .backbones import load_backbone
        backbone, tokenizer = load_backbone(name, **kwargs)
        return cls(backbone, tokenizer, name)

    # -- tasks -------------------------------------------------------------------------------------
    def add_task(
        self,
        name: str,
        methods: MethodSpec | Sequence[MethodSpec] = DEFAULT_METHOD,
        num_labels: int | None = None,
        label_names: Sequence[str] | None = None,
        pooling: str | None = None,
        head_dropout: float = 0.1,
        generative: bool = False,
    ) -> TaskDelta:
        """Attach a new delta (one method or a combination) and a head.

        ``methods``: a method name or spec as on the command line (``"lora:rank=16"``,
        ``"lora+bitfit"``), a dict with a ``method`` key, a config, or a list of those; an
        empty list gives a head-only task (a probe on whatever else is active, e.g. a shared delta).
        Give ``label_names`` or ``num_labels`` for a classification head; with neither the task has
        no head. ``generative=True``: the task's head is the backbone's own language-model head
        (text in, text out; see :mod:`adapters.generation`); ``label_names`` are then only kept
        as the task's answer words.
        """
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise TaskError(f"invalid task name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit")
        if name in self.tasks:
            raise TaskError(f"task {name!r} already exists; remove_task({name!r}) first or pick another name")
        configs = method_configs(methods)
        if label_names is not None:  # two classes of one name: a prediction (or an answer word) would name either
            if isinstance(label_names, str) or (num_labels is not None and num_labels != len(label_names)) or len(set(label_names)) < len(label_names):
                raise ConfigError(f"label_names {label_names!r} must be distinct names in a list, one per label (num_labels={num_labels})")
            num_labels = len(label_names)
        head: ClassificationHead | LMHead | None = None
        if generative:
            if self.lm_head is None:
                raise ConfigError(f"task {name!r} is generative, but the backbone {self.backbone_name!r} has no language-model "
                                  "head (an encoder, or a decoder loaded with AutoModel instead of AutoModelForCausalLM)")
            head = LMHead(self.lm_head)
        elif num_labels is not None:
            head = ClassificationHead(self.backbone.config.hidden_size, num_labels, pooling or self.spec.pooling, head_dropout)
        task = TaskDelta(name, configs, self, head, label_names).to(self.device)
        task.train(self.training)  # no dropout in a head added to a model used for inference
        for delta in task.deltas.values():
            delta.attach(self.backbone, partial(self._is_active, name))
        self.tasks[name] = task
        self._update_trainable()
        return task

    def remove_task(self, name: str) -> None:
        """Detach and delete a task's delta and head (not while another task uses it)."""
        task = self._task(name)
        users = [t for t, other in self.tasks.items() if any(name in d.sources() for d in other.deltas.values())]
        if users:
            raise TaskError(f"task {name!r} is used by {users}; remove those first")
        for delta in task.deltas.values():
            delta.detach()
        del self.tasks[name]
        self._active = tuple(t for t in self._active if t != name)
        if self._head == name:
            self._head = self._active[-1] if self._active else None

    def _task(self, name: str) -> TaskDelta:
        if not isinstance(name, str):  # e.g. activate(["a", "b"]): an unhashable-type error otherwise
            raise TaskError(f"a task is named by a string, got {name!r} (several tasks: activate('a', 'b'))")
        if name not in self.tasks:
            known = ", ".join(self.tasks) or "none yet"
            raise TaskError(f"unknown task {name!r}; known tasks: {known}")
        return self.tasks[name]

    def task(self, name: str) -> TaskDelta:
        """The :class:`TaskDelta` of a task (error lists the known tasks)."""
        return self._task(name)

    # -- which deltas act --------------------------------------------------------------------------
    def _is_active(self, name: str) -> bool:
        return name in self._active

    @property
    def active_tasks(self) -> tuple[str, ...]:
        return self._active

    def activate(self, *names: str) -> None:
        """Make these tasks' deltas act (in order); the last one's head gives the logits.

        Only active, unfrozen tasks have trainable parameters."""
        for n in names:
            self._task(n)
        self._active = tuple(names)
        self._head = names[-1] if names else None
        self._update_trainable()

    def deactivate(self) -> None:
        """No delta acts; no head is selected."""
        self.activate()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block no delta acts (the selected head still does): the backbone's output."""
        saved = self._active
        self._active = ()
        try:
            yield
        finally:
            self._active = saved

    @contextlib.contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Temporarily activate ``names``."""
        saved, head = self._active, self._head
        self.activate(*names)
        try:
            yield
        finally:
            self._active, self._head = saved, head
            self._update_trainable()

    @contextlib.contextmanager
    def acting(self, *names: str) -> Iterator[None]:
        """Within the block ``names`` act (the last one's head gives the logits) while what trains
        stays as it is: a second forward pass inside a training step (an earlier task's replayed
        batch, a teacher's outputs) without touching which parameters require gradients."""
        for n in names:
            self._task(n)
        saved, head = self._active, self._head
        self._active, self._head = tuple(names), (names[-1] if names else None)
        try:
            yield
        finally:
            self._active, self._head = saved, head

    def freeze(self, name: str) -> None:
        """Mark a trained task frozen: its parameters stay untrainable and training-time
        reparameterisations are folded away."""
        task = self._task(name)
        for delta in task.deltas.values():
            if delta.capabilities.folds:
                delta.fold()
        task.frozen = True
        self._update_trainable()

    def unfreeze(self, name: str) -> None:
        """Make a frozen task (delta and head) trainable again."""
        task = self._task(name)
        task.frozen = task.delta_frozen = False
        self._update_trainable()

    def freeze_delta(self, name: str) -> None:
        """Freeze a task's delta but not its head: training then fits the head alone."""
        self._task(name).delta_frozen = True
        self._update_trainable()

    def hold(self, name: str, parameters: Iterable[str]) -> None:
        """Keep these parameters of a task (names as in ``task.named_parameters()``) fixed while
        the rest of the task trains."""
        task = self._task(name)
        held = frozenset(parameters)
        unknown = held - {n for n, _ in task.named_parameters()}
        if unknown:
            raise TaskError(f"task {name!r} has no parameters {sorted(unknown)}")
        task.held = held
        self._update_trainable()

    def _update_trainable(self) -> None:
        for name, task in self.tasks.items():
            flag = name in self._active and not task.frozen
            for n, p in task.named_parameters():
                p.requires_grad_(flag and n not in task.held)
            if task.delta_frozen:
                for p in task.deltas.parameters():
                    p.requires_grad_(False)

    # -- forward -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def active_deltas(self) -> list[Delta]:
        """The deltas that act in a forward pass now, in order."""
        return [d for t in self._active for d in self.tasks[t].deltas.values()]

    def transform_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]
    ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, Any], int]:
        """The active input transforms (prompt tuning) applied to ``input_ids``: (input embeddings,
        or None when no transform is active; the widened mask; the extra inputs; positions added
        in front)."""
        transforms = [d for d in self.active_deltas() if d.capabilities.input_transform]
        if not transforms:
            return None, attention_mask, extra, 0
        embeds = self.backbone.get_input_embeddings()(input_ids)
        mask, added = attention_mask, 0
        for d in transforms:
            embeds, mask, extra, n = d.transform_inputs(embeds, mask, extra)
            added += n
        return embeds, mask, extra, added

    def encode(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states of the backbone with the active deltas, and their mask.

        Positions a delta prepended (prompt tokens) are removed, so the result lines up with the
        input tokens whatever is active."""
        attention_mask = checked_batch(input_ids, attention_mask)
        extra = {k: v for k, v in extra.items() if v is not None}
        embeds, mask, extra, added = self.transform_inputs(input_ids, attention_mask, extra)
        check_positions(self, input_ids.shape[1], added)
        body = self.backbone.get_encoder() if self.seq2seq else self.backbone  # T5: its encoder's states
        if embeds is None:
            out = body(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return out.last_hidden_state, attention_mask
        out = body(inputs_embeds=embeds, attention_mask=mask, **extra)
        return out.last_hidden_state[:, added:], attention_mask

    @property
    def decoder_start_id(self) -> int | None:
        """The token an encoder-decoder's decoder starts from (None for other backbones)."""
        if not self.seq2seq:
            return None
        cfg = self.backbone.config
        return cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id

    def seq2seq_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       decoder_input_ids: torch.Tensor, **extra: Any) -> torch.Tensor:
        """An encoder-decoder's LM logits (B, T_decoder, V): the active input transforms act on
        the encoder's input; the model's own output layer (T5 scales before it) gives the logits."""
        attention_mask = checked_batch(input_ids, attention_mask)
        embeds, mask, extra, _ = self.transform_inputs(input_ids, attention_mask, {k: v for k, v in extra.items() if v is not None})
        inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
        return self.backbone(**inputs, attention_mask=mask, decoder_input_ids=decoder_input_ids, **extra).logits

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logit_positions: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        """Logits of the selected task's head (the last task passed to :meth:`activate`); with
        ``logit_positions`` ((B, T) bool, a generative task) the (N, V) logits there alone."""
        if self._head is None:
            raise TaskError("no task selected: call model.activate(task) first")
        head = self.tasks[self._head].head
        if head is None or (logit_positions is not None and not head.generative):
            raise TaskError(f"task {self._head!r} has no head (it was added without labels)" if head is None else
                            "logit_positions selects token positions of a generative task's logits")
        if self.seq2seq and head.generative:
            if extra.get("decoder_input_ids") is None:
                raise ValueError("a generative task on an encoder-decoder needs decoder_input_ids")
            logits = self.seq2seq_logits(input_ids, attention_mask, **extra)
            return logits if logit_positions is None else logits[logit_positions]
        hidden, mask = self.encode(input_ids, attention_mask, **extra)
        # a loss over the answer tokens reads no other position: the LM head skips them
        return head(hidden, mask) if logit_positions is None else head(hidden[logit_positions], None)

    # -- HuggingFace PEFT's format -------------------------------------------------------------------
    def export_peft(self, name: str, directory: Any, base_model: str | None = None) -> Any:
        """Write task ``name`` as a PEFT adapter (:func:`adapters.peft_export.export_peft`)."""
        from .peft_export import export_peft
        return export_peft(self, name, directory, base_model)

    def import_peft(self, source: Any, name: str | None = None, **options: Any) -> str:
        """Add a PEFT adapter (a directory or a hub id) as a task (:func:`adapters.peft_import.import_peft`)."""
        from .peft_import import import_peft
        return import_peft(self, source, name, **options)

    def mixed(self, tasks: Sequence[str] | None = None, dtype: torch.dtype | None = None) -> MixedTasks:
        """A :class:`~adapters.mixed.MixedTasks` serving ``tasks`` (default: all) in mixed batches,
        each example through its own task's delta and head."""
        return MixedTasks(self, list(self.tasks) if tasks is None else tasks, dtype)

    # -- accounting --------------------------------------------------------------------------------
    def backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def parameter_report(self, name: str) -> dict[str, Any]:
        """Parameter counts of one task and their ratio to the backbone."""
        task, backbone = self._task(name), self.backbone_parameters()
        return {"task": name, "methods": {k: d.num_parameters() for k, d in task.deltas.items()},
                "delta_params": task.delta_parameters(), "head_params": task.head_parameters(),
                "backbone_params": backbone, "delta_ratio": task.delta_parameters() / backbone}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
