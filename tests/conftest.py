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


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite runs many tiny ops. On a small (2-core, often shared) CPU, OpenMP's spin-waiting
    # makes each one 10-100x slower with 2 threads than with 1 (measured: a [4, 32, 4] depthwise
    # conv1d took 48 ms vs 0.3 ms). Restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
