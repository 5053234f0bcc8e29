"""The paper's efficiency claims (cache, TPOT, throughput, prefill) for a config and its all-MLA twin.

Same as ``hla bench``; see ``hla.generation.claims`` for what is measured and how.

    python benchmarks/claims.py --config 1b --out-dir benchmarks/results/claims
    python benchmarks/claims.py --config kimi-linear-48b   # H200: ~98 GB of random bf16 weights
"""

import sys

from hla.generation.claims import main

if __name__ == "__main__":
    sys.exit(main())
