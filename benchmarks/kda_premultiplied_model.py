"""What the forward walk's operand forms cost in output accuracy, without a GPU (float64 model).

The Triton forward walks the chunks with the state S (fp32, entering products as bf16 hi + lo halves)
over stored operands. Two forms (chunk.PREMULTIPLY):

- plain: w = M diag(beta) k exp(Gamma) in bf16, u = M diag(beta) v in fp32; v_new = u - w S rounded to
  bf16 for o = qg S + A_qk v_new and S <- diag(dl) S + kd^T v_new;
- premultiplied: k exp(Gamma) in bf16 and v as it is; Z = v - k exp(Gamma) S; o = qg S + AqkM Z and
  S <- diag(dl) S + kdM^T Z with AqkM = A_qk M diag(beta), kdM = (M diag(beta))^T kd both rounded to
  bf16 (formed from M's bf16 hi + lo halves). Z enters the products rounded to bf16 ("once"), or as hi +
  lo halves in the state update only ("state hi+lo": what the kernels do), or in both.

This script runs each on check_kda_gpu.py's inputs in float64 with those roundings and prints the
output's and the final state's relative error against the exact float64 reference, per draw.

    PYTHONPATH=src python3 benchmarks/kda_premultiplied_model.py [--gates kimi,near0,safe] [--draws 2] [--T 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from check_kda_gpu import make_inputs, run_ref  # noqa: E402
from hla.ops.kda.chunk_torch import chunk_kda_cumsum, chunk_kda_intra, chunk_kda_solve_tril  # noqa: E402
from hla.ops.kda.gate import kda_gate, l2norm  # noqa: E402

BT = 64
# (label, form, Z's rounding in o's intra term, in the state update)
VARIANTS = (("plain", "plain", "once", "once"), ("premultiplied, Z once", "pre", "once", "once"),
            ("premultiplied, state hi+lo", "pre", "once", "hilo"), ("premultiplied, both hi+lo", "pre", "hilo", "hilo"))


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def hi_lo(x: torch.Tensor) -> torch.Tensor:
    hi = bf16(x)
    return hi + bf16(x - hi)


def _rounded(x: torch.Tensor, how: str) -> torch.Tensor:
    return bf16(x) if how == "once" else hi_lo(x)


def chunked_inputs(x: dict, k: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """What the kernels' chunk stages see of ``check_kda_gpu.make_inputs``' raw projections x, in float64: q (l2-normed
    and scaled), k (l2-normed, or the given k), v and the chunks' cumulative gate ``[B, HV, NT, BT, D]``, beta
    ``[B, HV, NT, BT]`` (after its sigmoid); T a multiple of BT, no varlen."""
    q = l2norm(x["q"].double())
    k = l2norm(x["k"].double()) if k is None else k
    g = kda_gate(x["g"].double(), x["A_log"].double(), x["dt_bias"].double(), x["lower_bound"])

    def chunks(t):
        t = t if t.dim() == 4 else t.unsqueeze(-1)
        B, T, HV, D = t.shape
        return t.reshape(B, T // BT, BT, HV, D).permute(0, 3, 1, 2, 4)

    return (chunks(q) * q.shape[-1] ** -0.5, chunks(k), chunks(x["v"].double()), chunk_kda_cumsum(chunks(g)),
            chunks(torch.sigmoid(x["beta"].double())).squeeze(-1))


def walk(x: dict, form: str, z_out: str, z_state: str) -> tuple[torch.Tensor, torch.Tensor]:
    """o ``[B, T, HV, V]`` and the final state ``[B, HV, K, V]`` of one form, in float64 with the kernels'
    roundings; x from ``check_kda_gpu.make_inputs`` (T a multiple of BT, no varlen)."""
    qc, kc, vc, gc, bc = chunked_inputs(x)
    A_kk, A_qk = chunk_kda_intra(qc, kc, gc, bc, "auto")
    Mb = hi_lo(chunk_kda_solve_tril(A_kk) * bc.unsqueeze(-2))  # M diag(beta), as the solve's hi + lo halves
    kexp, g_last = bf16(kc * torch.exp(gc)), gc[..., -1:, :]
    kd, qg, aqk = bf16(kc * torch.exp(g_last - gc)), bf16(qc * torch.exp(gc)), bf16(A_qk)
    if form == "plain":
        W, U, KD, AQ = bf16(Mb @ kexp), Mb @ vc, kd, aqk
    else:
        W, U, KD, AQ = kexp, vc, bf16(Mb.transpose(-1, -2) @ kd), bf16(aqk @ Mb)
    decay = torch.exp(g_last).transpose(-1, -2)
    S = x["h0"].double().clone()
    outs = []
    for n in range(qc.shape[2]):
        S_ops = hi_lo(S)
        z = U[:, :, n] - W[:, :, n] @ S_ops
        outs.append(qg[:, :, n] @ S_ops + AQ[:, :, n] @ _rounded(z, z_out))
        S = decay[:, :, n] * S + KD[:, :, n].transpose(-1, -2) @ _rounded(z, z_state)
    o = torch.stack(outs, 2)
    B, HV, NT, _, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, NT * BT, HV, V), S


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default="kimi,near0,safe", help="comma list of check_kda_gpu.py gates")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--T", type=int, default=2048, help="tokens (a multiple of 64)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.T % BT:
        ap.error(f"--T: expected a multiple of {BT}, got {args.T}")
    torch.manual_seed(args.seed)
    print(f"T {args.T}, HV {args.heads}, K = V = {args.dim}; relative error vs exact float64, o / final state",
          flush=True)
    for gate in args.gates.split(","):
        for draw in range(args.draws):
            x = make_inputs(1, args.T, args.heads, args.heads, args.dim, args.dim, gate, torch.device("cpu"),
                            dtype=torch.bfloat16)
            _, o_ref, s_ref = run_ref(x)
            cols = []
            for label, form, z_out, z_state in VARIANTS:
                o, s = walk(x, form, z_out, z_state)
                eo = ((o - o_ref).norm() / o_ref.norm()).item()
                es = ((s - s_ref).norm() / s_ref.norm()).item()
                cols.append(f"{label} {eo:.2e} / {es:.2e}")
            print(f"{gate} draw {draw}: " + " | ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
