"""What the ops' launchers ask of the device they run on."""

from __future__ import annotations

import functools

import torch


def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, e.g. (9, 0) for Hopper (cached: torch's query is ~5 us of host time, asked
    several times a forward, whose host time at B1 T8192 is about its GPU time)."""
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


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
