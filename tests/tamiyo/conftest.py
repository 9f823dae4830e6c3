import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every Tamiyo test starts from the same global torch RNG state (weights, dropout)."""
    torch.manual_seed(0)
