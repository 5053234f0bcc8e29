import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture
def make_model():
    return build_tiny_model

