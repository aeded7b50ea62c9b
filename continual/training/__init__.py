"""Training a task's delta: settings, data, the step, the protocol, the loop, evaluation.

    config.py    TrainConfig, TrainResult, resolve_device (the one place a device name is read)
    data.py      tokenising, padded / length-bucketed loaders, endless training batches
    step.py      TrainStep (one optimisation step, no host sync), make_optimizer
    protocol.py  Protocol: schedule, dev evaluation, early stopping, best-on-dev weights, records
    loop.py      train_task, train_joint (the one loop, over a Protocol)
    evaluate.py  evaluate (accuracy, macro-F1, loss), macro_f1
    malloc.py    hold_freed_memory, apply: glibc keeps freed memory on a CPU (no page faults per step)
    distributed.py  data parallelism over torch.distributed (torchrun): DDP on the trainable deltas,
                 each rank's slice of the global batch, sharded evaluation, rank 0 writes
"""

from . import distributed, malloc
from .config import COMPILE_MODES, DROPOUT_MASKS, Recipe, Runtime, TrainConfig, TrainResult, check_lengths, position_limit, resolve_device
from .data import answers_cut, check_generative_length, prompts_cut
from .data import bucket_batches, collate_rows, bucketed_loader, endless_batches, eval_loader, majority_rate, make_loader, task_loader, tokenize
from .evaluate import answers, batch_logits, evaluate, evaluate_generation, macro_f1
from .malloc import MALLOC, hold_freed_memory
from .loop import fit, param_groups, train_joint, train_task
from .protocol import DivergedError, Protocol, lr_factor
from .step import AdjustGrads, ExtraLoss, TrainStep, make_optimizer, mfu, token_loss
from .textscore import score_texts

__all__ = [
    "COMPILE_MODES", "DROPOUT_MASKS", "MALLOC", "hold_freed_memory", "malloc", "Protocol", "DivergedError", "distributed", "check_lengths", "position_limit", "Recipe", "Runtime", "TrainConfig", "TrainResult", "AdjustGrads", "ExtraLoss", "TrainStep", "bucket_batches", "bucketed_loader",
    "collate_rows", "endless_batches", "eval_loader", "evaluate", "fit", "lr_factor", "macro_f1", "majority_rate", "make_loader",
    "make_optimizer", "mfu", "param_groups", "resolve_device", "tokenize", "train_joint", "train_task",
    "answers", "answers_cut", "prompts_cut", "batch_logits", "check_generative_length", "evaluate_generation", "score_texts", "task_loader", "token_loss",
]
