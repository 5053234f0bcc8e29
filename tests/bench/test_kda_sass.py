"""benchmarks/kda_sass.py: nvdisasm's text is counted per opcode and source line, and a real kernel (the
intra backward's gate launch, compiled for sm_90a on the CPU in a subprocess, ~4 s) comes out with its
exponentials (MUFU) attributed to its source."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

SNIPPET = """
        //## File "/x/src/hla/ops/kda/triton/intra_bwd.py", line 12
        /*0010*/                   MUFU.EX2 R3, R2 ;
        /*0020*/              @!P0 FMUL R4, R3, R3 ;
        //## File "/x/triton/language/standard.py", line 343
        /*0030*/                   SHFL.UP PT, R5, R4, 0x1, RZ ;
        /*0040*/                   FADD R4, R4, R5 ;
"""


def test_count_per_opcode_and_line():
    import kda_sass  # the parsing alone: no kernel imports (they would fix the interpreter mode)

    ops, per_line = kda_sass.count(SNIPPET)
    assert ops == {"MUFU": 1, "FMUL": 1, "SHFL": 1, "FADD": 1}
    assert per_line["intra_bwd.py:12"] == {"MUFU": 1, "FMUL": 1}
    assert per_line["standard.py:343"] == {"SHFL": 1, "FADD": 1}


def test_gate_launch_compiles_and_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(BENCH / "kda_sass.py"), "intra_bwd gate", "--top", "40"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("intra_bwd gate BK=") and int(first.split(": ")[1].split()[0]) > 500, first
    assert "MUFU" in r.stdout and "intra_bwd.py:" in r.stdout


def _ncu_csv(sources, samples, barrier):
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_barrier", "stall_wait",
            "stall_barrier (Not Issued)"]
    rows = [["Kernel Name", "k"], head]
    lines = zip(sources, samples, barrier, strict=True)
    rows += [[f"0x{i:x}", src, str(n), str(b), str(n - b), "0"] for i, (src, n, b) in enumerate(lines)]
    return "\n".join(",".join(f'"{c}"' for c in r) for r in rows)


def test_ncu_stalls_per_line():
    import kda_sass

    srcs = ["MUFU.EX2 R3, R2 ;", "@!P0 FMUL R4, R3, R3 ;", "SHFL.UP PT, R5, R4, 0x1, RZ ;", "FADD R4, R4, R5 ;"]
    total, per_line = kda_sass.stalls(SNIPPET, _ncu_csv(srcs, [5, 1, 10, 2], [0, 0, 7, 1]))
    assert per_line["intra_bwd.py:12"]["all"] == 6 and per_line["standard.py:343"]["all"] == 12
    assert per_line["standard.py:343"]["barrier"] == 8 and total == {"barrier": 8, "wait": 10}
    # another compile's instruction stream is refused, not silently misattributed
    with pytest.raises(ValueError, match="not this compile"):
        kda_sass.stalls(SNIPPET, _ncu_csv(srcs[:3] + ["FMUL R4, R4, R5 ;"], [1] * 4, [0] * 4))
