"""Training and (to come) the lifelong-learning scheduler, metrics, baselines, tracking and CLI."""

from .train import TrainConfig, TrainResult, evaluate, make_loader, resolve_device, tokenize, train_task

__all__ = ["TrainConfig", "TrainResult", "evaluate", "make_loader", "resolve_device", "tokenize", "train_task"]
