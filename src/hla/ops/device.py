"""What the ops' launchers ask of the device they run on."""

from __future__ import annotations

import functools

import torch


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device; 4 elsewhere (the Triton interpreter runs the kernels on the CPU,
    where a launch shape only needs a plausible count)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    # cached: torch's query costs host time on every call, and launchers ask on every call
    return torch.cuda.get_device_properties(index).multi_processor_count
