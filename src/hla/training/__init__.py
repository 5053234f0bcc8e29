"""Training: the loop (trainer.py), schedules, checkpoints, DDP setup and evaluation."""

from hla.training.evaluate import accuracy_by_length, perplexity, task_accuracy
from hla.training.schedule import warmup_cosine, wsd
from hla.training.trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "accuracy_by_length", "perplexity", "task_accuracy", "warmup_cosine", "wsd"]
