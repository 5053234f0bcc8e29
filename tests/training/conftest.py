import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture
def make_model():
    return build_tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    # these tests run many tiny steps; on a shared 2-core machine, 2 OpenMP threads made them up to 5x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
