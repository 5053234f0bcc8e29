"""KDA on the CPU: the reference loop vs the chunked torch path, forward and forward+backward.

Question: is the chunked path fast enough to train small models on a CPU? Issue 2 asks for at
least 20x over the reference for forward+backward at B1 T1024 H16 K=V=128 fp32.

    PYTHONPATH=src python benchmarks/kda_cpu.py [--T 1024 --H 16 --D 128 --threads N --write]

The reference's forward+backward is slow (minutes-scale at full size), so it runs once; the
chunked path reports the best of ``--repeats`` runs after a warm-up. ``--write`` appends the table
to benchmarks/results/kda_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from hla.ops.kda import kda
from hla.ops.kda.selfcheck import random_kda_inputs


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128, help="K = V")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the chunked path (best is kept)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/results/kda_cpu.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = random_kda_inputs(1, args.T, args.H, args.H, args.D, args.D, dtype=torch.float32)
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}

    def fwd(backend):
        with torch.no_grad():
            kda(**x, backend=backend)

    def fwd_bwd(backend):
        for t in leaves.values():
            t.grad = None
        o, _ = kda(**leaves, backend=backend)
        o.backward(torch.ones_like(o))

    rows = []
    fwd("torch")
    fwd_bwd("torch")  # warm-up
    t_fwd = timed(lambda: fwd("torch"), args.repeats)
    t_fb = timed(lambda: fwd_bwd("torch"), args.repeats)
    print(f"chunked   fwd {t_fwd * 1e3:9.1f} ms   fwd+bwd {t_fb * 1e3:9.1f} ms", flush=True)
    r_fwd = timed(lambda: fwd("reference"), 1)
    print(f"reference fwd {r_fwd * 1e3:9.1f} ms", flush=True)
    r_fb = timed(lambda: fwd_bwd("reference"), 1)
    print(f"reference fwd+bwd {r_fb * 1e3:9.1f} ms", flush=True)
    rows.append(("forward", r_fwd, t_fwd))
    rows.append(("forward+backward", r_fb, t_fb))

    shape = f"B1 T{args.T} H{args.H} K=V={args.D} fp32"
    threads = torch.get_num_threads()
    table = [
        f"| {shape} | reference | chunked (torch) | speedup |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r, c in rows:
        table.append(f"| {name} | {r * 1e3:.1f} ms | {c * 1e3:.1f} ms | {r / c:.1f}x |")
    print("\n".join(table))
    fb_ratio = r_fb / t_fb
    verdict = "meets" if fb_ratio >= 20 else "MISSES"
    print(f"forward+backward speedup {fb_ratio:.1f}x ({verdict} the 20x target)")

    if args.write:
        cmd = "PYTHONPATH=src python benchmarks/kda_cpu.py " + " ".join(sys.argv[1:])
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = "\n".join([
            f"### {shape}, {threads} torch thread(s)",
            "",
            f"- date: {now}",
            f"- machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs), torch "
            f"{torch.__version__}, {threads} torch thread(s)",
            f"- command: `{cmd.strip()}`",
            f"- chunked: best of {args.repeats} after a warm-up; reference: one run each",
            "",
            *table,
            "",
            f"Forward+backward speedup {fb_ratio:.1f}x ({verdict} the 20x target of issue 2).",
            "",
        ])
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kda_cpu.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        new_file = not os.path.exists(out)
        with open(out, "a") as f:
            if new_file:
                f.write("## KDA on the CPU: reference loop vs chunked torch path\n\n")
            f.write(text + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
