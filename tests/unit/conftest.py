"""Shared unit-test fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm_base():
    """The frozen 6-block all-MiniLM-L6-v2 with its seeded head, loaded once for the strategy tests."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from node import trainer
    model, _ = trainer.load_base(trainer.ModelSpec())
    return model


@pytest.fixture
def base(minilm_base):
    return minilm_base
