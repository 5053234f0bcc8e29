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

With ``--ncu CSV`` (the SASS page of an ncu report of the same launch on the GPU: ``ncu --set full -o rep ...``, then
``ncu -i rep.ncu-rep --page source --csv --print-source sass > CSV``) it prints instead where the warps stalled:
ncu's stall samples per source line and reason, matched instruction by instruction to this compile (refused when
the two instruction streams differ, e.g. another launch shape). Session 12 read from it that the fast launch's
reductions and scans hold ~30% of its stall samples and that the recurrence waits on barriers, not tensor cores.
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


def instructions(text: str) -> list[tuple[str, str]]:
    """(opcode, source line "file.py:123") of each instruction of nvdisasm output, in order."""
    out, line = [], "?"
    for row in text.splitlines():
        m = _LINE.search(row)
        if m:
            line = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = _INSTR.match(row)
        if m:
            out.append((m.group(1).split(".")[0], line))
    return out


def count(text: str) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """Opcode counts overall and per source line ("file.py:123") of nvdisasm output."""
    ops, per_line = collections.Counter(), collections.defaultdict(collections.Counter)
    for op, line in instructions(text):
        ops[op] += 1
        per_line[line][op] += 1
    return ops, per_line


def stalls(text: str, csv_text: str) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """ncu's warp-stall samples (its SASS source page as CSV) per reason overall and per source line of nvdisasm
    output ``text`` of the same cubin; "all" counts every sample of a line. Raises ValueError when the instruction
    streams differ (another compile)."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(csv_text)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    col = {h: i for i, h in enumerate(rows[head])}
    reasons = [h for h in rows[head] if h.startswith("stall_") and "Not Issued" not in h]
    ours = instructions(text)
    theirs = [r for r in rows[head + 1:] if len(r) == len(rows[head])]
    ops = [(_INSTR.match("/*0*/ " + r[col["Source"]].strip()) or [None, "?"])[1].split(".")[0] for r in theirs]
    if len(ops) != len(ours) or any(a != b for a, (b, _) in zip(ops, ours, strict=True)):
        raise ValueError(f"the ncu report's {len(ops)} instructions are not this compile's {len(ours)}: profile the "
                         "launch shape of this row (kernel, warps, stages, register cap)")
    total, per_line = collections.Counter(), collections.defaultdict(collections.Counter)
    for r, (_, ln) in zip(theirs, ours, strict=True):
        per_line[ln]["all"] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for name in reasons:
            n = int(r[col[name]] or 0)
            per_line[ln][name[len("stall_"):]] += n
            total[name[len("stall_"):]] += n
    return total, per_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", help="prefix of a kda_prefill_regs.py row, e.g. 'intra fast BK=64'")
    ap.add_argument("--top", type=int, default=30, help="source lines to list")
    ap.add_argument("--ncu", default=None, help="ncu SASS-page CSV of this launch: print stall samples per line")
    args = ap.parse_args(argv)
    name, text = sass(args.kernel)
    if args.ncu:
        with open(args.ncu) as f:
            total, per_line = stalls(text, f.read())
        n = sum(c["all"] for c in per_line.values())
        print(f"{name}: {n} stall samples; " + ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in total.most_common(8)))
        print("\n| % of samples | source line | top reasons |\n|---|---|---|")
        for line, c in sorted(per_line.items(), key=lambda kv: -kv[1]["all"])[:args.top]:
            top = ", ".join(f"{k} {v}" for k, v in c.most_common(6) if k != "all")
            print(f"| {100 * c['all'] / n:.1f} | {line} | {top} |")
        return 0
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
