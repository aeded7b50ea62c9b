"""Lifelong learning on a frozen backbone: training, the stream scheduler, metrics, baselines,
MLflow tracking and the ``continual`` command line.

    from continual import run_stream, make_strategy, MLflowLogger, TrainConfig
    result = run_stream(stream, model, make_strategy("per-task", ["lora"]), TrainConfig(max_steps=200),
                        "runs/my-stream", loggers=[MLflowLogger()])
    result.matrix.R, result.metrics["BWT"]

Where things live (see ARCHITECTURE.md):
    training/     the training loop, its protocol, the step, data, evaluation
    strategies/   per-task deltas (ours) and the baselines, Avalanche's among them
    scheduler.py  the task loop that fills the accuracy matrix
    rundir.py     the run directory: state, resume, results, loading a finished run
    metrics.py    ACC / BWT / FWT / forgetting;  plots.py  every picture;  tracking.py  MLflow
    studies/      compare, combine, route, transfer;  cli/  the command line
"""

from .metrics import (
    AccuracyMatrix, average_accuracy, backward_transfer, forgetting, forward_transfer, summarize,
)
from .plots import format_matrix, heatmap
from .loadrun import load_run_model, load_run_tasks
from .rundir import RunState, RunStateError
from .scheduler import StreamResult, run_stream, task_seed
from .strategies import STRATEGIES, Strategy, make_strategy
from .tracking import DEFAULT_TRACKING_URI, MLflowLogger, StreamLogger
from .training import (
    Protocol, Recipe, Runtime, TrainConfig, TrainResult, eval_loader, evaluate, majority_rate, make_loader, resolve_device, tokenize,
    train_joint, train_task,
)

__all__ = [
    "AccuracyMatrix", "DEFAULT_TRACKING_URI", "MLflowLogger", "Protocol", "RunState", "RunStateError", "STRATEGIES",
    "Strategy", "StreamLogger", "StreamResult", "Recipe", "Runtime", "TrainConfig", "TrainResult", "average_accuracy", "backward_transfer",
    "eval_loader", "evaluate", "forgetting", "format_matrix", "forward_transfer", "heatmap", "load_run_model",
    "load_run_tasks", "majority_rate", "make_loader", "make_strategy", "resolve_device", "run_stream", "summarize",
    "task_seed", "tokenize", "train_joint", "train_task",
]
