"""Kimi Linear's efficiency claims against an all-MLA twin: cache bytes, TPOT, max-batch throughput, prefill.

Question: for a hybrid config (3:1 KDA:MLA) and its twin with every layer MLA (same widths, same
FFNs), how much smaller is the cache, how much faster is a decode step at batch 1 as the context
grows to 1M, how much more throughput does the saved memory buy as a larger batch, and how does
prefill scale? The technical report says 74-75%, 2.2x, 6.3x and 2.9x at 1M for the 48B model.

Decode points fill the cache with random latents and states (lengths set to the context) instead
of a prefill; values do not change decode time. All logic lives in ``hla.bench.claims`` (also
``hla bench``); this script is the same command.

    python benchmarks/claims.py --config scaled-2b --time-budget 480
    python benchmarks/claims.py --config kimi-linear-48b --contexts 4K 128K 1M
    python benchmarks/claims.py --replot benchmarks/results/claims-scaled-2b.json
"""

from __future__ import annotations

import sys

from hla.bench.claims import main

if __name__ == "__main__":
    sys.exit(main())
