"""Subnormal floats in KDA's chunked CPU path: forward+backward time with and without flush-to-zero.

Question: do strongly decaying gates (a trained model's gate reaches -20..-100 per token in some
channels) make ``chunk_kda_torch`` produce subnormal fp32 numbers, which x86 CPUs handle in
microcode (~100x slower per operation)? If the path avoids them, ``torch.set_flush_denormal(True)``
makes no difference to its time.

    PYTHONPATH=src python benchmarks/kda_subnormal.py [--threads 1 --gate-scale 10 --count]
    git show 12c07e0:src/hla/ops/kda/chunk_torch.py > /tmp/chunk_torch_before.py   # before the fix
    PYTHONPATH=src python benchmarks/kda_subnormal.py --baseline /tmp/chunk_torch_before.py

Inputs: ``random_kda_inputs`` (unit-norm q/k, Kimi gate at its init, per-token decay about -0.1..-11)
with ``g`` multiplied by ``--gate-scale``; shaped like the demo's MQAR training batches (B32, H2,
K=V=32), T=128. ``--count`` also lists, per aten op of forward and backward, how many subnormal
values it produced (without flush-to-zero). ``--baseline FILE`` also times another version of
chunk_torch.py (loaded as a module), interleaved run by run with the current one so that load from
other jobs hits both alike; each figure is the best of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hla.ops.kda.chunk_torch import chunk_kda_torch
from hla.ops.kda.selfcheck import random_kda_inputs


def subnormal_count(x: torch.Tensor) -> int:
    if not x.is_floating_point() or x.numel() == 0:
        return 0
    tiny = torch.finfo(x.dtype).tiny
    a = x.detach().abs()
    return int(((a > 0) & (a < tiny)).sum())


class SubnormalCounter(TorchDispatchMode):
    """Counts subnormal values in the outputs of every aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.total: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in func.__name__:  # uninitialised memory
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                n = subnormal_count(t)
                if n:
                    self.counts[str(func.overloadpacket.__name__)] += n
                self.total[str(func.overloadpacket.__name__)] += t.numel()
        return out


def make_inputs(B: int, T: int, H: int, D: int, gate_scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = random_kda_inputs(B, T, H, K=D, dtype=torch.float32, gate_scale=gate_scale, generator=gen)
    for name in ("q", "k", "v", "g", "beta"):
        x[name].requires_grad_(True)
    return x


def fwd_bwd(fn: Callable, x: dict[str, torch.Tensor]) -> None:
    o, _ = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=x["q"].shape[-1] ** -0.5)
    o.square().sum().backward()
    for t in x.values():
        t.grad = None


def load_baseline(path: str) -> Callable:
    spec = importlib.util.spec_from_file_location("chunk_torch_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.chunk_kda_torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--D", type=int, default=32, help="K = V")
    p.add_argument("--gate-scale", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--baseline", default=None, help="another chunk_torch.py to time alongside (e.g. before a fix)")
    p.add_argument("--count", action="store_true", help="list subnormal outputs per aten op")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"current": chunk_kda_torch}
    if args.baseline:
        versions["baseline"] = load_baseline(args.baseline)
    print(f"chunk_kda_torch forward+backward, B{args.B} T{args.T} H{args.H} K=V={args.D} fp32, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats} (interleaved)")
    print("| gate scale | version | flush_denormal off | flush_denormal on | off / on | subnormals produced |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for gs in args.gate_scale:
        x = make_inputs(args.B, args.T, args.H, args.D, gs)
        counts = {}
        for name, fn in versions.items():
            counter = SubnormalCounter()
            with counter:
                fwd_bwd(fn, x)
            counts[name] = counter
        best = {(name, flush): float("inf") for name in versions for flush in (False, True)}
        for r in range(args.repeats + 1):  # round 0 is the warm-up
            for (name, flush) in best:
                torch.set_flush_denormal(flush)
                t0 = time.perf_counter()
                fwd_bwd(versions[name], x)
                if r:
                    best[name, flush] = min(best[name, flush], time.perf_counter() - t0)
        torch.set_flush_denormal(False)
        for name in versions:
            t_off, t_on = best[name, False], best[name, True]
            n_sub = sum(counts[name].counts.values())
            print(f"| {gs:g} | {name} | {t_off * 1e3:.1f} ms | {t_on * 1e3:.1f} ms | {t_off / t_on:.2f} | {n_sub} |",
                  flush=True)
            if args.count:
                for op, n in counts[name].counts.most_common():
                    print(f"    {op}: {n} of {counts[name].total[op]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
