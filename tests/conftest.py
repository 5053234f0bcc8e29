import os

# Triton kernels run under the interpreter on the CPU; this must be set before triton is imported.
if not os.environ.get("HLA_TEST_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
