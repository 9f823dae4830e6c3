import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every Tamiyo test starts from the same global torch RNG state (weights, dropout)."""
    torch.manual_seed(0)


@pytest.fixture
def staff_client(user, token):
    from rest_framework.test import APIClient

    user.is_staff = True
    user.save()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client
