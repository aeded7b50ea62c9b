"""Training and (to come) the lifelong-learning scheduler, metrics, baselines, tracking and CLI."""

from .train import (
    TrainConfig, TrainResult, eval_loader, evaluate, majority_rate, make_loader, resolve_device, tokenize, train_task,
)

__all__ = [
    "TrainConfig", "TrainResult", "eval_loader", "evaluate", "majority_rate", "make_loader", "resolve_device", "tokenize",
    "train_task",
]
