"""Contrastive pretraining: configuration, the training step, the run loop and its checkpoints."""

from clipforge.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, resolve_train_config
from clipforge.train.loop import Hook, HookContext, Preempted, RunSummary, TrainingError, train

__all__ = [
    "DataConfig",
    "Hook",
    "HookContext",
    "OptimConfig",
    "Preempted",
    "RunConfig",
    "RunSummary",
    "TrainConfig",
    "TrainingError",
    "resolve_train_config",
    "train",
]
