"""Test defaults: offline, no wandb, deterministic torch, tiny shapes."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from saekit.synthetic import SparseDataset, make_sparse_dataset


@pytest.fixture(scope="session")
def sparse_data() -> SparseDataset:
    """Small activations built from 48 known features, 3 per row."""
    return make_sparse_dataset(12_000, 24, 48, 3, seed=0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
