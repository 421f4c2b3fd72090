import os

import pytest
import torch

# Keep the tests' cache (compiled kernel, converted default model) in one place per machine.
os.environ.setdefault("SHRINK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shrink"))

from helpers import MLP, tiny_llama  # noqa: E402


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()
