"""``hla demo``: the project's main job on this machine (grows with the project).

This first version is a self-check of the KDA paths against each other (reference loop, chunked
torch path, varlen, decode; float64 and float32) and a small CPU speed table.
"""

from __future__ import annotations

import argparse
import time

import torch

from hla.ops.kda.selfcheck import run_selfcheck, time_paths


def run_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    device = getattr(args, "device", None) or "cpu"
    print(f"KDA self-check on {device}: every path vs the float64 reference loop (||out-ref|| / ||ref||)")
    rows = run_selfcheck(device=device)
    width = max(len(r.name) for r in rows)
    for r in rows:
        status = "pass" if r.ok else "FAIL"
        print(f"  {r.name:<{width}}  {r.dtype:<7}  {r.rel_error:9.2e}  (tol {r.tol:.0e})  {status}")
    failed = [r for r in rows if not r.ok]

    T, H, D = 512, 4, 64
    print(f"\nCPU forward time, B1 T{T} H{H} K=V={D} fp32 ({torch.get_num_threads()} threads):")
    for backend, seconds, speedup in time_paths(T=T, H=H, K=D):
        name = "reference loop" if backend == "reference" else "chunked (torch)"
        print(f"  {name:<16} {seconds * 1e3:8.1f} ms   {speedup:5.1f}x")

    verdict = "all checks passed" if not failed else f"{len(failed)} check(s) FAILED"
    print(f"\n{verdict} in {time.perf_counter() - t0:.1f} s")
    return 0 if not failed else 1
