"""Training sparse autoencoders on activation batches."""

from .config import DataConfig, RunConfig, TrainConfig
from .trainer import NonFiniteError, Trainer, TrainResult

__all__ = ["DataConfig", "NonFiniteError", "RunConfig", "TrainConfig", "TrainResult", "Trainer"]
