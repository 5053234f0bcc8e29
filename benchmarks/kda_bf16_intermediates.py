"""What the Triton kernels' bf16 intermediates cost in gradient accuracy, without a GPU.

The chunked kernels store w = M (beta k exp(Gamma)), kd = k exp(Gamma_last - Gamma) and qg = q exp(Gamma)
in the input dtype (bf16) and run the state recurrence on them, whose state update takes v_new in
bf16 too ("vn"); the fast intra launch forms A_qk and A_kk from one bf16 product of anchored factors
("pairs"). This script runs the chunked KDA in float64 on the CPU with any of the four rounded
to bf16 in the forward (gradients passed straight through) and prints each gradient's relative
error against the exact float64 run, per draw. Inputs are check_kda_gpu.py's (`--gate near0` is
the case whose dA_log failed on the H200).

    PYTHONPATH=src python3 benchmarks/kda_bf16_intermediates.py [--gate near0] [--draws 8] [--T 2048]
        [--variants pairs+qg,w+kd+vn]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from check_kda_gpu import make_inputs  # noqa: E402
from hla.ops.kda.chunk_torch import (  # noqa: E402
    chunk_kda_cumsum,
    chunk_kda_intra,
    chunk_kda_solve_tril,
    chunk_kda_wu,
)
from hla.ops.kda.gate import kda_gate, l2norm  # noqa: E402

ROUNDABLE = ("w", "kd", "qg", "vn", "pairs")
# The state path's three (plain form) also as ":values" (rounded where the forward multiplies them: the states and
# v_new the backward recomputes) or ":grads" (rounded only in the gradient formulas that take them: w^T dv_new,
# kd dS, dA_qk and dkd from v_new), to tell which side of their rounding the gradients feel.
SPLIT_ROUNDABLE = tuple(f"{n}:{side}" for n in ("w", "kd", "vn") for side in ("values", "grads"))
GRADS = ("q", "k", "v", "g", "beta", "A_log", "dt_bias")


def _sides(name: str, rounded) -> tuple[bool, bool]:
    """Whether name is rounded in the products' values and in their gradient formulas."""
    return (name in rounded or f"{name}:values" in rounded, name in rounded or f"{name}:grads" in rounded)


class _RoundedMatmul(torch.autograd.Function):
    """a @ b with each operand rounded to bf16 in the forward value and / or in the gradient formula of the other
    (ra, rb: (values, grads) flags); with both flags set this is the product of two stored bf16 tensors."""

    @staticmethod
    def forward(ctx, a, b, ra, rb):
        ctx.save_for_backward(a, b)
        ctx.ra, ctx.rb = ra, rb
        return _bf16(a, ra[0]) @ _bf16(b, rb[0])

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad @ _bf16(b, ctx.rb[1]).transpose(-1, -2), _bf16(a, ctx.ra[1]).transpose(-1, -2) @ grad, None, None


def _bf16(x, on: bool):
    return x.to(torch.bfloat16).to(x.dtype) if on else x


class _RoundBF16(torch.autograd.Function):
    """bf16 rounding in the forward, identity in the backward (the kernels differentiate as if the
    stored tensor were exact)."""

    @staticmethod
    def forward(ctx, x):
        return _bf16(x, True)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _pairs_bf16(qc, kc, gc, bc):
    """A_kk (beta-scaled) and A_qk ``[.., BT, BT]`` as the fast intra launch forms them for 16-bit inputs: one bf16
    product of anchored factors, x_i exp(G_i - G_a) and k_j exp(G_a - G_j) each rounded to bf16, anchor a = 31 for
    pairs across the two 32-row halves and 15 / 47 for pairs inside a half (float64 otherwise: no overflow here)."""
    BT = gc.shape[-2]
    i = torch.arange(BT)
    half = i // (BT // 2)
    cross = (half[:, None] == 1) & (half[None, :] == 0)
    same = half[:, None] == half[None, :]
    A_qk = torch.zeros(*gc.shape[:-1], BT, dtype=gc.dtype)
    A_kk = torch.zeros_like(A_qk)
    for a, mask in ((BT // 2 - 1, cross), (BT // 4 - 1, same & (half[:, None] == 0)),
                    (3 * BT // 4 - 1, same & (half[:, None] == 1))):
        ga = gc[..., a:a + 1, :]
        left = torch.exp(gc - ga)
        fk = (kc * torch.exp(ga - gc)).to(torch.bfloat16).double()
        fq = (qc * left).to(torch.bfloat16).double()
        fkr = (kc * left).to(torch.bfloat16).double()
        A_qk = torch.where(mask & (i[:, None] >= i[None, :]), fq @ fk.transpose(-1, -2), A_qk)
        A_kk = torch.where(mask & (i[:, None] > i[None, :]), fkr @ fk.transpose(-1, -2), A_kk)
    return A_kk * bc.unsqueeze(-1), A_qk


def chunked_kda(q, k, v, g, beta, scale: float, rounded=(), BT: int = 64, form: str = "plain"):
    """Chunked KDA, one sequence: q, k, v ``[1, T, HV, D]`` float64 (q, k normalised), g ``[1, T, HV,
    K]`` log-decay, beta ``[1, T, HV]``; T a multiple of BT. The names in rounded are stored in bf16 (in the plain form
    w, kd and vn also as "name:values" / "name:grads": SPLIT_ROUNDABLE).
    form "premultiplied" walks as the forward does with chunk.PREMULTIPLY: "w" rounds k exp(Gamma), "kd" both kd and
    (M diag(beta))^T kd, "pairs" also A_qk M diag(beta), "vn" Z = v - k exp(Gamma) S where o takes it (the state
    update takes Z's hi + lo halves: exact here).
    -> o ``[1, HV, NT, BT, V]``, final state ``[1, HV, K, V]``."""
    def chunks(x):
        x = x if x.dim() == 4 else x.unsqueeze(-1)
        B, T, HV, D = x.shape
        return x.reshape(B, T // BT, BT, HV, D).permute(0, 3, 1, 2, 4)

    def store(x, name):
        return _RoundBF16.apply(x) if name in rounded else x

    if form == "premultiplied" and set(rounded) & set(SPLIT_ROUNDABLE):
        raise ValueError(f"rounded: {', '.join(SPLIT_ROUNDABLE)} are for the plain form, got {sorted(rounded)}")

    qc, kc, vc, gch, bc = chunks(q) * scale, chunks(k), chunks(v), chunks(g), chunks(beta).squeeze(-1)
    gc = chunk_kda_cumsum(gch)
    A_kk, A_qk = chunk_kda_intra(qc, kc, gc, bc, "auto")
    if "pairs" in rounded:  # the pair products' bf16 operands, gradients passed straight through
        with torch.no_grad():
            kk, qk = _pairs_bf16(qc, kc, gc, bc)
        A_kk, A_qk = A_kk + (kk - A_kk).detach(), A_qk + (qk - A_qk).detach()
    g_last = gc[..., -1:, :]
    qg = store(qc * torch.exp(gc), "qg")
    decay = torch.exp(g_last).transpose(-1, -2)  # [1, HV, NT, K, 1]
    S = torch.zeros(*qc.shape[:2], qc.shape[-1], vc.shape[-1], dtype=qc.dtype)
    if form == "premultiplied":
        Mb = chunk_kda_solve_tril(A_kk) * bc.unsqueeze(-2)  # M diag(beta)
        kexp = store(kc * torch.exp(gc), "w")
        kdm = store(Mb.transpose(-1, -2) @ store(kc * torch.exp(g_last - gc), "kd"), "kd").transpose(-1, -2)
        aqm = store(A_qk @ Mb, "pairs")
        outs = []
        for v_n, w_n, d_n, k_n, q_n, a_n in zip(vc.unbind(2), kexp.unbind(2), decay.unbind(2), kdm.unbind(2),
                                                 qg.unbind(2), aqm.unbind(2), strict=True):
            z = v_n - w_n @ S
            outs.append(q_n @ S + a_n @ store(z, "vn"))
            S = d_n * S + k_n @ z
        return torch.stack(outs, 2), S
    w, u = chunk_kda_wu(chunk_kda_solve_tril(A_kk), kc, vc, gc, bc)
    kd = (kc * torch.exp(g_last - gc)).transpose(-1, -2)
    rw, rkd, rvn, no = _sides("w", rounded), _sides("kd", rounded), _sides("vn", rounded), (False, False)
    outs = []
    for u_n, w_n, d_n, k_n, q_n, a_n in zip(u.unbind(2), w.unbind(2), decay.unbind(2), kd.unbind(2), qg.unbind(2),
                                             A_qk.unbind(2), strict=True):
        v_new = u_n - _RoundedMatmul.apply(w_n, S, rw, no)
        outs.append(q_n @ S + a_n @ v_new)
        # the kernels' state update takes kd and v_new in bf16
        S = d_n * S + _RoundedMatmul.apply(k_n, v_new, rkd, rvn)
    return torch.stack(outs, 2), S


def gradients(x: dict, rounded, do=None, ds=None, form: str = "plain"):
    """Gradients of <o, do> + <S, ds> for the raw projections of x (float64 leaves)."""
    d = {n: x[n].detach().double().requires_grad_(True) for n in GRADS}
    gate = kda_gate(d["g"], d["A_log"], d["dt_bias"], None)
    o, s = chunked_kda(l2norm(d["q"]), l2norm(d["k"]), d["v"], gate, torch.sigmoid(d["beta"]),
                       d["q"].shape[-1] ** -0.5, rounded, form=form)
    if do is None:
        do, ds = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad([o, s], [d[n] for n in GRADS], [do, ds])
    return dict(zip(GRADS, grads, strict=True)), do, ds


def parse_variants(text: str) -> list[tuple[str, ...]]:
    """'pairs+qg,w+kd+vn' -> [('pairs', 'qg'), ('w', 'kd', 'vn')]; names outside ROUNDABLE are refused."""
    variants = [tuple(n for n in v.split("+") if n) for v in text.split(",") if v]
    unknown = sorted({n for v in variants for n in v} - set(ROUNDABLE) - set(SPLIT_ROUNDABLE))
    if unknown or not variants:
        raise argparse.ArgumentTypeError(
            f"expected sets of {', '.join(ROUNDABLE + SPLIT_ROUNDABLE)} joined by '+', got {text!r}")
    return variants


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gate", default="near0", choices=("kimi", "bench", "near0", "veryneg"))
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048, help="tokens (a multiple of 64)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--form", default="plain", choices=("plain", "premultiplied"),
                    help="the forward walk's operands (chunk.PREMULTIPLY): see chunked_kda")
    ap.add_argument("--variants", type=parse_variants, default=None,
                    help="comma-separated sets of tensors rounded together, each joined by '+', e.g. "
                         f"'pairs+qg,w+kd+vn' (of {', '.join(ROUNDABLE + SPLIT_ROUNDABLE)}; default: each alone, "
                         "then all)")
    args = ap.parse_args(argv)
    if args.T % 64:
        ap.error(f"--T: expected a multiple of 64, got {args.T}")
    torch.manual_seed(0)
    variants = args.variants or [(n,) for n in ROUNDABLE] + [ROUNDABLE]
    print(f"{args.form} form, gate {args.gate}, T {args.T}, HV {args.heads}, K = V = {args.dim}; relative error vs "
          f"exact float64 (dA_log / dg), bf16-stored: " + ", ".join("+".join(v) for v in variants), flush=True)
    for draw in range(args.draws):
        x = make_inputs(1, args.T, args.heads, args.heads, args.dim, args.dim, args.gate, torch.device("cpu"),
                        dtype=torch.bfloat16)
        exact, do, ds = gradients(x, ())
        cols = []
        for v in variants:
            got, _, _ = gradients(x, v, do, ds, form=args.form)
            e = {n: ((got[n] - exact[n]).norm() / exact[n].norm()).item() for n in ("A_log", "g")}
            cols.append(f"{'+'.join(v)} {e['A_log']:.1e} / {e['g']:.1e}")
        print(f"draw {draw}: " + "   ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
