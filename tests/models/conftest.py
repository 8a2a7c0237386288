import pytest
import torch

from .tiny import tiny_config


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
