"""benchmarks/kda_sass.py: nvdisasm's text is counted per opcode and source line, and a real kernel (the
intra backward's gate launch, compiled for sm_90a on the CPU in a subprocess, ~4 s) comes out with its
exponentials (MUFU) attributed to its source."""

import os
import subprocess
import sys
from pathlib import Path

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
