"""Where a KDA kernel's instructions are: its sm_90a SASS, compiled on a machine without a GPU, counted per
source line and per opcode (static counts: one pass through the code, loops counted once).

    PYTHONPATH=src python3 benchmarks/kda_sass.py "intra fast BK=64" [--top 30]

The kernel is named by a prefix of a ``kda_prefill_regs.py`` row (the launched settings come first there);
kda_regs.compile_sm90 builds the cubin with the ptxas bundled with Triton and its nvdisasm prints it with line
info.
Per line: the instruction count and its top opcodes; then the lines with the most barriers and shared-memory
traffic, which is where layout conversions, reductions and scans show. Session 10 read from it that tl.cumsum
and the masked row sums are ~27% of the fast launch, the reverse cumsum 25% of the intra backward's gate
launch, and exp's x log2(e) multiply ~4% of the fast and block launches (kda_notes.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def sass(name_prefix: str) -> tuple[str, str]:
    """(row name, nvdisasm text with line info) of the first kda_prefill_regs row starting with name_prefix.
    Imports the kernels for a GPU target, so not under the Triton interpreter (whose mode they fix at import)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kda_sass.py compiles for a GPU target: unset TRITON_INTERPRET")
    sys.path.insert(0, os.path.dirname(__file__))
    import triton

    from kda_prefill_regs import cases
    from kda_regs import compile_sm90

    row = next((r for r in cases() if r[0].startswith(name_prefix)), None)
    if row is None:
        raise SystemExit(f"no kda_prefill_regs row starts with {name_prefix!r}")
    name, fn, types, consts, nw, ns, *cap = row
    cubin = compile_sm90(fn, types, consts, nw, ns, maxnreg=cap[0] if cap else None).asm["cubin"]
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([nvdisasm, "-g", "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return name, text


def count(text: str) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """Opcode counts overall and per source line ("file.py:123") of nvdisasm output."""
    ops, per_line = collections.Counter(), collections.defaultdict(collections.Counter)
    line = "?"
    for row in text.splitlines():
        m = _LINE.search(row)
        if m:
            line = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = _INSTR.match(row)
        if m:
            op = m.group(1).split(".")[0]
            ops[op] += 1
            per_line[line][op] += 1
    return ops, per_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", help="prefix of a kda_prefill_regs.py row, e.g. 'intra fast BK=64'")
    ap.add_argument("--top", type=int, default=30, help="source lines to list")
    args = ap.parse_args(argv)
    name, text = sass(args.kernel)
    ops, per_line = count(text)
    print(f"{name}: {sum(ops.values())} instructions")
    print("opcodes: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
    print("\n| instructions | source line | top opcodes |\n|---|---|---|")
    for line, c in sorted(per_line.items(), key=lambda kv: -sum(kv[1].values()))[:args.top]:
        print(f"| {sum(c.values())} | {line} | " + ", ".join(f"{k} {v}" for k, v in c.most_common(6)) + " |")
    print("\n| source line | BAR | LDS | STS | SHFL |\n|---|---|---|---|---|")
    sync = sorted(per_line.items(), key=lambda kv: -(kv[1]["BAR"] * 1000 + kv[1]["LDS"] + kv[1]["STS"] + kv[1]["SHFL"]))
    for line, c in sync[:args.top // 2]:
        print(f"| {line} | {c['BAR']} | {c['LDS']} | {c['STS']} | {c['SHFL']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
