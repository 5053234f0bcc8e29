"""Registers, spills and shared memory of the chunked-KDA kernels, compiled for sm_90a on a machine
without a GPU (triton.compile + the ptxas bundled with triton, through kda_regs.compile_report).

    PYTHONPATH=src python3 benchmarks/kda_prefill_regs.py [--only intra,solve,recurrence,chain,products,intra_bwd]

'recurrence wgmma' rows: the Gluon walk of recurrence_wgmma.py (TMA descriptor arguments, one warpgroup).

intra_bwd rows: the backward's two launches, 'dkk' (passes A, B up to dA_kk) and 'pair' (pair sums,
dg, l2norm backward).

Shapes as in the benchmark: H = HV = 32, K = V = 128, bf16 inputs, Kimi gate with dt_bias, l2norm
and beta-sigmoid fused; each kernel at its launched settings and a few alternatives. Blocks per SM
from the register count (64K registers, 2048 threads per SM).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.language as tl

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(__file__))

from hla.ops.kda.triton.intra import (  # noqa: E402
    AQK_BF16,
    RECOMPUTE_MAX_REGISTERS,
    SAFE_SPAN,
    SOLVE_INV_PRECISION,
    SOLVE_M_PIECES,
    SOLVE_MAX_REGISTERS,
    SOLVE_STAGES,
    kda_intra_fwd_kernel,
    kda_intra_solve_kernel,
)
from hla.ops.kda.triton.intra_bwd import (  # noqa: E402
    BLOCK_STAGES,
    DKK_STAGES,
    IN_BLOCK_SPAN,
    kda_intra_bwd_block_kernel,
    kda_intra_bwd_dkk_kernel,
    kda_intra_bwd_gate_kernel,
)
from hla.ops.kda.triton.intra_wgmma import BLOCK_K as FAST_WGMMA_BK  # noqa: E402
from hla.ops.kda.triton.intra_wgmma import HEAD_MAJOR_GRID as FAST_WGMMA_HEAD_MAJOR  # noqa: E402
from hla.ops.kda.triton.intra_wgmma import MAX_REGISTERS as FAST_WGMMA_CAP  # noqa: E402
from hla.ops.kda.triton.intra_wgmma import NUM_WARPS as FAST_WGMMA_WARPS  # noqa: E402
from hla.ops.kda.triton.intra_wgmma import TMA_LOADS as FAST_WGMMA_TMA  # noqa: E402
from hla.ops.kda.triton.intra_wgmma import kda_intra_fast_wgmma_kernel  # noqa: E402
from hla.ops.kda.triton.recurrence import kda_recurrence_fwd_kernel  # noqa: E402
from hla.ops.kda.triton.recurrence_bwd import (  # noqa: E402
    PRODUCTS_STAGES,
    PRODUCTS_STAGES_FP32,
    kda_chain_adv_kernel,
    kda_state_grad_chain_kernel,
    kda_state_grad_products_kernel,
)
from hla.ops.kda.triton.recurrence_wgmma import DL_LAYOUT, WALK_SLOTS, kda_walk_wgmma_kernel  # noqa: E402
from kda_regs import blocks_per_sm, compile_report, tma_type  # noqa: E402

HV, K, V, BT = 32, 128, 128, 64
F32, BF16, I32 = "*fp32", "*bf16", "*i32"
GATE = dict(HAS_GATE=True, HAS_BIAS=True, HAS_LB=False)


def cases():
    intra_t = dict(q=BF16, k=BF16, g=BF16, A_log=F32, dt_bias=F32, Aqk=BF16, Apart=F32, w=BF16, qg=BF16, kd=BF16,
                   dl=F32, Pbuf=F32, exact_flag=I32, gam=F32, inorm=F32, chunk_bounds=I32, scale="fp32",
                   lower_bound="fp32")
    # the fast launch sets the flags per key block of FBK channels; the exact launch may read them in
    # narrower blocks (launched: fast BK 64 / 4 warps / 3 stages, exact BK 32 / 4 warps / 1 stage)
    for exact, bk, nw, ns in ((False, 64, 4, 3), (False, 64, 4, 2), (False, 64, 4, 1), (False, 32, 4, 1),
                              (False, 64, 8, 1), (True, 32, 4, 1), (True, 64, 4, 1), (True, 32, 8, 1),
                              (True, 64, 8, 1)):
        yield (f"intra {'exact' if exact else 'fast'} BK={bk}", kda_intra_fwd_kernel, intra_t,
               dict(H=HV, HV=HV, K=K, BK=bk, FBK=64 if exact else bk, BT=BT, USE_L2=True, PREC="tf32",
                    SAFE_SPAN=SAFE_SPAN, EXACT=exact, PAIRS=True, STORE_GAMMA=False, OP=tl.bfloat16,
                    SPLIT_A=AQK_BF16, **GATE), nw, ns)
    # the Gluon fast launch (intra_wgmma.py, launched on sm_90 for bf16 inputs), both gates
    fast_t = {n: t for n, t in intra_t.items() if n not in ("gam", "inorm")} | {
        n: tma_type((8192, HV * K), [BT, FAST_WGMMA_BK], torch.bfloat16) for n in ("q_desc", "k_desc", "g_desc")}
    for lb in (False, True):
        yield (f"intra fast wgmma BK={FAST_WGMMA_BK}{' bounded gate' if lb else ''}", kda_intra_fast_wgmma_kernel,
               fast_t, dict(H=HV, HV=HV, K=K, BK=FAST_WGMMA_BK, BT=BT, HAS_GATE=True, HAS_BIAS=True, HAS_LB=lb,
                            USE_L2=True, SAFE_SPAN=SAFE_SPAN, SPLIT_A=AQK_BF16, HEAD_MAJOR=FAST_WGMMA_HEAD_MAJOR,
                            TMA_LOADS=FAST_WGMMA_TMA),
               FAST_WGMMA_WARPS, 1, FAST_WGMMA_CAP)
    # the backward's recompute with A_qk, P, M saved: per-token tensors, Gamma and the row norms
    # (launched: BK 64 / 4 warps / 168 registers, intra.RECOMPUTE_BLOCK_K / RECOMPUTE_WARPS / RECOMPUTE_MAX_REGISTERS)
    for bk, nw, cap in ((64, 4, RECOMPUTE_MAX_REGISTERS), (32, 4, None), (64, 4, None), (128, 8, None)):
        yield (f"intra per-token BK={bk} cap {cap}", kda_intra_fwd_kernel, intra_t,
               dict(H=HV, HV=HV, K=K, BK=bk, FBK=bk, BT=BT, USE_L2=True, PREC="tf32", SAFE_SPAN=SAFE_SPAN, EXACT=False,
                    PAIRS=False, STORE_GAMMA=True, OP=tl.bfloat16, **GATE), nw, 1, cap)
    solve_t = dict(v=BF16, beta=BF16, w=BF16, u=F32, Pbuf=F32, Mbuf=F32, chunk_bounds=I32, kd=BF16, Aqk=BF16,
                   AqkM=BF16, ready=I32)
    # launched: 2 warps, intra.SOLVE_STAGES (every row here at that), the inverse in intra.SOLVE_INV_PRECISION for
    # 16-bit inputs (ieee for fp32); w, u from M's bf16 halves uncapped for bf16 inputs (intra.SOLVE_M_PIECES), one
    # tf32 product at intra.SOLVE_MAX_REGISTERS for fp16 inputs
    for nw, inv, cap, pieces in ((2, SOLVE_INV_PRECISION, None, SOLVE_M_PIECES),
                                 (2, SOLVE_INV_PRECISION, SOLVE_MAX_REGISTERS, False),
                                 (2, SOLVE_INV_PRECISION, 168, True), (1, "ieee", None, False),
                                 (2, "ieee", None, False), (4, "ieee", None, False)):
        yield (f"solve inverse {inv} cap {cap} M halves {pieces}", kda_intra_solve_kernel, solve_t,
               dict(HV=HV, K=K, V=V, BK=64, BV=64, BT=BT, USE_SIGMOID=True, PREC="tf32", PREC_INV=inv,
                    INVERT=True, M_PIECES=pieces), nw, SOLVE_STAGES, cap)
    # the forward's solve with the premultiplied walk operands (chunk.PREMULTIPLY): AqkM and kd <- (M diag(beta))^T kd
    yield (f"solve premultiplied, inverse {SOLVE_INV_PRECISION}, M halves {SOLVE_M_PIECES}", kda_intra_solve_kernel,
           solve_t, dict(HV=HV, K=K, V=V, BK=64, BV=64, BT=BT, USE_SIGMOID=True, PREC="tf32",
                         PREC_INV=SOLVE_INV_PRECISION, INVERT=True, M_PIECES=SOLVE_M_PIECES, PREMUL=True), 2,
           SOLVE_STAGES, None)
    yield ("solve premultiplied, signalling a walk beside it", kda_intra_solve_kernel,
           solve_t, dict(HV=HV, K=K, V=V, BK=64, BV=64, BT=BT, USE_SIGMOID=True, PREC="tf32",
                         PREC_INV=SOLVE_INV_PRECISION, INVERT=True, M_PIECES=SOLVE_M_PIECES, PREMUL=True, SIGNAL=True,
                         HEAD_MAJOR=True),
           2, SOLVE_STAGES, None)
    yield (f"solve, saved M, M halves {SOLVE_M_PIECES}", kda_intra_solve_kernel, solve_t,
           dict(HV=HV, K=K, V=V, BK=64, BV=64, BT=BT, USE_SIGMOID=True, PREC="tf32", PREC_INV="ieee",
                INVERT=False, M_PIECES=SOLVE_M_PIECES), 2, SOLVE_STAGES,
           None if SOLVE_M_PIECES else SOLVE_MAX_REGISTERS)
    rec_t = dict(w=BF16, u=F32, qg=BF16, kd=BF16, dl=F32, Aqk=BF16, h0=F32, o=BF16, ht=F32, h=F32, vnew=F32,
                 cu_seqlens=I32, chunk_offsets=I32)
    for bv, split in ((32, True), (32, False), (64, True)):
        yield (f"recurrence BV={bv} split={split}", kda_recurrence_fwd_kernel, rec_t,
               dict(HV=HV, K=K, V=V, BK=K, BV=bv, BT=BT, HAS_H0=False, STORE_FINAL=False, STORE_H=False,
                    WRITE_O=True, SPLIT=split, NUM_STAGES=3), 4, 3)
    # the Gluon walk takes TMA descriptors of [TT, HV * D] views (TT = 8192 tokens)
    bf, f32 = torch.bfloat16, torch.float32
    walk_t = dict(w_desc=tma_type((8192, HV * K), [BT, K], bf), kd_desc=tma_type((8192, HV * K), [BT, K], bf),
                  qg_desc=tma_type((8192, HV * K), [BT, K], bf), a_desc=tma_type((8192, HV * BT), [BT, BT], bf),
                  u_desc=tma_type((8192, HV * V), [BT, 64], f32),
                  dl_desc=tma_type((128 * HV, K), [1, K], f32, DL_LAYOUT),
                  h0=F32, o=BF16, ht=F32, h=BF16, vnew=BF16,
                  cu_seqlens=I32, chunk_offsets=I32, ready=I32)
    for slots in sorted({WALK_SLOTS, 2}, reverse=True):
        yield (f"recurrence wgmma slots={slots}", kda_walk_wgmma_kernel, walk_t,
               dict(HV=HV, K=K, V=V, BT=BT, HAS_H0=False, STORE_FINAL=False, WRITE_O=True, STORE_H=False, NS=slots),
               4, 1)
    # the forward's walk over the premultiplied operands (u = v bf16)
    yield (f"recurrence wgmma slots={WALK_SLOTS} premultiplied", kda_walk_wgmma_kernel,
           dict(walk_t, u_desc=tma_type((8192, HV * V), [BT, 64], bf)),
           dict(HV=HV, K=K, V=V, BT=BT, HAS_H0=False, STORE_FINAL=False, WRITE_O=True, STORE_H=False, NS=WALK_SLOTS,
                VN_SPLIT=True), 4, 1)
    # the same with the o products' tiles in a slot of their own and two ring slots (recurrence_wgmma.TWO_PER_SM's
    # O_SLOT: two programs per SM where the grid has more programs than SMs)
    yield ("recurrence wgmma slots=2 premultiplied, o slot", kda_walk_wgmma_kernel,
           dict(walk_t, u_desc=tma_type((8192, HV * V), [BT, 64], bf)),
           dict(HV=HV, K=K, V=V, BT=BT, HAS_H0=False, STORE_FINAL=False, WRITE_O=True, STORE_H=False, NS=2,
                VN_SPLIT=True, O_SLOT=True), 4, 1)
    # the same waiting for the solve running beside it (chunk.BESIDE_SOLVE's per-chunk flags)
    yield (f"recurrence wgmma slots={WALK_SLOTS} premultiplied, beside the solve", kda_walk_wgmma_kernel,
           dict(walk_t, u_desc=tma_type((8192, HV * V), [BT, 64], bf)),
           dict(HV=HV, K=K, V=V, BT=BT, HAS_H0=False, STORE_FINAL=False, WRITE_O=True, STORE_H=False, NS=WALK_SLOTS,
                VN_SPLIT=True, WAIT=True), 4, 1)
    yield (f"recurrence wgmma states slots={WALK_SLOTS}", kda_walk_wgmma_kernel, walk_t,
           dict(HV=HV, K=K, V=V, BT=BT, HAS_H0=True, STORE_FINAL=False, WRITE_O=False, STORE_H=True, NS=WALK_SLOTS),
           4, 1)
    chain_t = dict(w=BF16, qg=BF16, kd=BF16, dl=F32, Aqk=F32, do=BF16, dht=F32, dh=F32, dvnew=F32, dh0=F32,
                   cu_seqlens=I32, chunk_offsets=I32)
    # recurrence_bwd._chain_launch picks the launch: 16-bit inputs the first row (K <= 128), fp32 inputs
    # the second (fp32 tiles), K > 128 the third; the last row is FLA's precision (dS rounded to bf16).
    for bv, nw, ns, f32, mixed, adv in ((32, 4, 3, False, "hilo", "launch"), (32, 4, 3, False, "hilo", "mixed"),
                                        (32, 4, 1, True, "tf32", "tf32"), (64, 8, 1, False, "hilo", "tf32"),
                                        (32, 4, 3, False, "bf16", "launch")):
        # dS snapshots and A_qk: bf16 for bf16 tiles (recurrence_bwd.SNAPSHOT_DH, intra.AQK_BF16: the "mixed" rows),
        # fp32 for fp16 / fp32 tiles
        bf16_row = adv == "mixed"
        yield (f"chain BV={bv} {'fp32' if f32 else 'bf16'} dots {mixed} A^T do {adv}", kda_state_grad_chain_kernel,
               dict(chain_t, dh=BF16 if bf16_row else F32, Aqk=BF16 if bf16_row else F32),
               dict(HV=HV, K=K, V=V, BK=K, BV=bv, BT=BT, HAS_DHT=True, STORE_DH0=True,
                    NUM_STAGES=ns, F32_DOTS=f32, MIXED=mixed, ADV=adv), nw, ns)
    yield ("chain A^T do launch (adv launch)", kda_chain_adv_kernel,
           dict(Aqk=F32, do=BF16, adv=F32, chunk_bounds=I32), dict(HV=HV, V=V, BV=64, BT=BT), 4, 1)
    # launched: BV 64 (0.42 ms against 0.47 at 32, H200, session 5); bf16 snapshots (h, v_new, dS:
    # recurrence.SNAPSHOT_H, SNAPSHOT_VNEW, recurrence_bwd.SNAPSHOT_DH) at PRODUCTS_STAGES, fp32 ones at
    # PRODUCTS_STAGES_FP32
    for bv, snap, native, ns in ((64, BF16, True, PRODUCTS_STAGES), (64, F32, False, PRODUCTS_STAGES_FP32),
                                 (32, F32, False, PRODUCTS_STAGES_FP32)):
        prod_t = dict(h=snap, vnew=snap, dh=snap, dvnew=F32, do=BF16, dqg=F32, dw=F32, dkd=F32, dA=F32, ddl=F32,
                      chunk_bounds=I32)
        yield (f"products BK=128 BV={bv} snapshots {'bf16' if native else 'fp32'}", kda_state_grad_products_kernel,
               prod_t, dict(HV=HV, K=K, V=V, BK=K, BV=bv, BT=BT, NATIVE=native), 8, ns)
    dkk_t = dict(v=BF16, beta=BF16, w=BF16, u=F32, M=F32, P=F32, du=F32, dw=F32, dv=F32, dx=F32, dP=F32,
                 dbeta=F32, chunk_bounds=I32)
    # launched: BK 32 / 2 warps, tf32, 2 stages (intra_bwd.DKK_BLOCK_K, DKK_NUM_WARPS, DKK_PRECISION, DKK_STAGES)
    for bk, nw, prec in ((32, 2, "tf32"), (32, 4, "tf32"), (32, 4, "tf32x3"), (64, 4, "tf32x3"), (16, 4, "tf32x3"),
                         (32, 8, "tf32x3"), (64, 8, "tf32x3")):
        yield (f"intra_bwd dkk BK={bk} {prec}", kda_intra_bwd_dkk_kernel, dkk_t,
               dict(HV=HV, K=K, V=V, BK=bk, BV=64, BT=BT, USE_SIGMOID=True, PREC=prec), nw, DKK_STAGES)
    block_t = dict(q=BF16, k=BF16, gam=F32, inorm=F32, beta=BF16, dx=F32, dP=F32, dqg=F32, dkd=F32,
                   dA=F32, dq=F32, dk=F32, dgam=F32, dbeta=F32, dkk_part=F32, chunk_bounds=I32, scale="fp32")
    # launched: BK 128 / 4 warps / uncapped / 3 stages (intra_bwd.BLOCK_K, NUM_WARPS, MAX_REGISTERS, BLOCK_STAGES; every
    # row here at those stages), cross-block products in intra_bwd.BLOCK_PRECISION (bf16x3 since session 14, the last
    # row; tf32 before), in-block products in intra_bwd.IN_BLOCK_PRECISION (bf16x3); the rest are the session 12
    # sweep's shapes and precisions
    for bk, nw, prec, cap, inp in ((128, 4, "tf32", None, "bf16x3"), (128, 8, "tf32", 128, "bf16x3"),
                                   (128, 8, "tf32", None, "bf16x3"), (128, 4, "tf32", 224, "bf16x3"),
                                   (128, 4, "tf32", 168, "bf16x3"), (128, 4, "tf32", None, "tf32x3"),
                                   (64, 4, "tf32", None, "bf16x3"), (64, 2, "tf32", None, "bf16x3"),
                                   (128, 4, "tf32x3", None, "bf16x3"), (128, 4, "bf16x3", None, "bf16x3")):
        yield (f"intra_bwd block BK={bk} warps {nw} {prec} in-block {inp} cap {cap}", kda_intra_bwd_block_kernel,
               block_t, dict(H=HV, HV=HV, K=K, BK=bk, BT=BT, USE_L2=True, USE_SIGMOID=True, PREC=prec,
                             IN_SPAN=IN_BLOCK_SPAN, IN_PREC=inp), nw, BLOCK_STAGES, cap)
    gate_t = dict(g=BF16, A_log=F32, dt_bias=F32, dl=F32, dgam=F32, dkk_part=F32, ddl=F32, dg=BF16, dbias_part=F32,
                  dalog_part=F32, chunk_bounds=I32, lower_bound="fp32")
    # launched: BK 32 / 2 warps (intra_bwd.GATE_BLOCK_K, GATE_NUM_WARPS), one program per key block
    for bk, nw in ((32, 2), (16, 2), (32, 4), (64, 4)):
        yield (f"intra_bwd gate BK={bk}", kda_intra_bwd_gate_kernel, gate_t, dict(HV=HV, K=K, BK=bk, BT=BT, **GATE),
               nw, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma list of name prefixes")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else None
    print("| kernel | warps | stages | registers | spill stores B | spill loads B | shared KB | blocks/SM |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fn, types, consts, nw, ns, *cap in cases():
        if only and not any(name.startswith(o) for o in only):
            continue
        try:
            r = compile_report(fn, types, consts, nw, ns, maxnreg=cap[0] if cap else None)
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row, not a crash
            print(f"| {name} | {nw} | {ns} | error: {type(e).__name__}: {str(e)[:80]} | | | | |", flush=True)
            continue
        print(f"| {name} | {nw} | {ns} | {r['regs']} | {r['spill_stores']} | {r['spill_loads']} | "
              f"{r['shared'] / 1024:.0f} | {blocks_per_sm(r['regs'], nw)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
