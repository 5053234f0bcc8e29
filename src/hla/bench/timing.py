"""Measurement helpers shared by ``hla bench``, the generation benchmarks and ``benchmarks/``."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    The ceiling every memory-bound number in this project is compared with: the median of 20
    copies of ``nbytes`` (after 5 warm-ups), each synchronised and timed on the host clock.
    """
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    times = sorted(times[5:])
    return 2 * (nbytes // 2) * 2 / times[len(times) // 2]


def cuda_graph_replay(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Run ``fn`` eagerly ``warmup`` times on a side stream (compiles, autotunes), capture it in a
    CUDA graph and return the graph's ``replay``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
