"""Sparse autoencoder dictionaries: one module per architecture over a small shared base."""

from .base import SparseAutoencoder, StepContext, TrainOutput, fvu
from .batchtopk import BatchTopKSAE
from .config import SAEConfig
from .io import (
    ARCHITECTURES,
    build_dictionary,
    load_all,
    load_dictionary,
    read_index,
    save_dictionary,
    write_index,
)
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "StepContext",
    "TopKSAE",
    "TrainOutput",
    "build_dictionary",
    "fvu",
    "load_all",
    "load_dictionary",
    "read_index",
    "save_dictionary",
    "write_index",
]
