"""Shared inputs and the float64 ground truth for the Triton KDA tests (run under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from hla.ops.kda.gate import kda_gate, l2norm
from hla.ops.kda.reference import kda_reference

# Module mark of the interpreter tests (CPU tensors): skipped where HLA_TEST_ON_GPU runs the kernels on the GPU instead,
# so that `HLA_TEST_ON_GPU=1 pytest tests/ops/kda` runs the GPU tests and skips these rather than failing them.
INTERPRETER_ONLY = pytest.mark.skipif(bool(os.environ.get("HLA_TEST_ON_GPU")), reason="interpreter test (CPU tensors)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm()).item()


def make_inputs(B=1, T=80, H=1, HV=1, K=32, V=32, *, gate="kimi", N=None, h0=True, grad=False):
    """fp32 raw projections (what a layer passes with A_log/dt_bias), plus an initial state."""
    x = dict(
        q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, HV, V),
        g=torch.randn(B, T, HV, K) * 2, beta=torch.randn(B, T, HV),
        A_log=torch.rand(HV) * 2, dt_bias=torch.randn(HV * K) * 0.5, lower_bound=None,
        h0=torch.randn(N or B, HV, K, V) * 0.5 if h0 else None,
    )
    if gate == "safe":
        x["lower_bound"] = -5.0
    elif gate == "veryneg":
        x["g"] = x["g"] * 3 + 8
        x["A_log"] = torch.full((HV,), 2.7)
    if grad:
        for t in x.values():
            if torch.is_tensor(t):
                t.requires_grad_(True)
    return x


def reference(x, cu_seqlens=None, precomputed=False):
    """float64 kda_reference on the same inputs (gate, l2norm and sigmoid applied outside)."""
    d = {n: (t.double() if torch.is_tensor(t) else t) for n, t in x.items()}
    if precomputed:
        g, q, k, beta = d["g"], d["q"], d["k"], d["beta"]
    else:
        g = kda_gate(d["g"], d["A_log"], d["dt_bias"], d["lower_bound"])
        q, k, beta = l2norm(d["q"]), l2norm(d["k"]), torch.sigmoid(d["beta"])
    return kda_reference(q, k, d["v"], g, beta, initial_state=d["h0"], output_final_state=True,
                         cu_seqlens=cu_seqlens)


def precompute(x):
    """Turn raw projections into the already-activated inputs (g <= 0, beta in (0, 1), unit q/k)."""
    y = dict(x)
    y["g"] = kda_gate(x["g"], x["A_log"], x["dt_bias"], x["lower_bound"]).detach()
    y["q"], y["k"] = l2norm(x["q"]).detach(), l2norm(x["k"]).detach()
    y["beta"] = torch.sigmoid(x["beta"]).detach()
    y["A_log"] = y["dt_bias"] = y["lower_bound"] = None
    return y


def sm90_regs_rows(prefix: str) -> list[list[str]]:
    """The rows of ``benchmarks/kda_prefill_regs.py --only prefix`` (the kernels compiled for sm_90a, offline, in a
    subprocess without the interpreter): [name, warps, stages, registers, spill stores B, spill loads B, shared KB,
    blocks per SM] as strings. Asserts that the script ran, that some row matched and that none failed to compile."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[3] / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(bench.parent / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(bench / "kda_prefill_regs.py"), "--only", prefix],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in r.stdout.splitlines()
            if line.startswith(f"| {prefix}")]
    assert rows, r.stdout
    for row in rows:
        assert "error" not in row[3], f"{row[0]}: {row[3]}"
    return rows
