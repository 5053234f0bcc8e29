"""Command-line options of ``hla bench`` (no torch import, so building the CLI parser stays cheap)."""

from __future__ import annotations

import argparse

DEFAULT_CONTEXTS = (4096, 32768, 131072, 524288, 1048576)
DEFAULT_PREFILL = (4096, 8192, 16384, 32768, 65536, 131072)
STAGES = ("cache", "tpot", "breakdown", "throughput", "prefill")
DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def parse_length(text: str) -> int:
    """``"4096"``, ``"4K"`` (4096), ``"1M"`` (1048576) -> int."""
    t = str(text).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length like 4096, 4K or 1M, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive length, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="scaled-2b",
                   help="preset (tiny, small, 1b, kimi-linear-48b), bench config (scaled-2b) or config.json path")
    p.add_argument("--twin", default="all_mla", help="schedule of the baseline twin (default all_mla)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--contexts", type=parse_length, nargs="+", default=list(DEFAULT_CONTEXTS),
                   help="contexts of the cache table and TPOT (4K, 32K, 128K, 512K, 1M)")
    p.add_argument("--throughput-contexts", type=parse_length, nargs="+", default=None,
                   help="contexts of the max-batch throughput (default: --contexts)")
    p.add_argument("--prefill-lengths", type=parse_length, nargs="+", default=list(DEFAULT_PREFILL))
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point (median)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=None, help="cap on the searched batch (default 1024; 4 on the CPU)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory to plan batches with (default: the device's free memory)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later points are skipped, not cut")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly even on CUDA")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default=None,
                   help="file stem of the JSON and Markdown (default claims); plots get it as a prefix")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only render the Markdown table and plots of an earlier run's JSON")
    p.add_argument("--seed", type=int, default=0)
