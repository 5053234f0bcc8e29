"""KDA recurrence backward: the single-kernel kda_recurrence_bwd against the two-launch
kda_state_grad_chain + kda_state_grad_products, accuracy (vs float64) and time, one run on one card.

Inputs are what the chunked backward hands to this stage: the intra stage and the recurrence with
store_h from bf16 raw projections (Kimi gate, l2norm, beta sigmoid in-kernel), do bf16, no dht.
Accuracy: relative error of every output of both against a float64 torch walk over the chunks.
Time: triton.testing.do_bench medians; bytes are the tensors each kernel must read and write once,
against the copy ceiling measured in the same run. A sweep of launch configurations follows.

    PYTHONPATH=src python3 benchmarks/kda_recurrence_bwd.py [--quick] [--out DIR]
    PYTHONPATH=src python3 benchmarks/kda_recurrence_bwd.py --smoke   # CPU, Triton interpreter, tiny
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from hla.ops.kda.triton.chunk import _ChunkMeta  # noqa: E402
from hla.ops.kda.triton.intra import kda_intra_fwd  # noqa: E402
from hla.ops.kda.triton.recurrence import kda_recurrence_bwd, kda_recurrence_fwd  # noqa: E402
from hla.ops.kda.triton.recurrence_bwd import kda_state_grad_chain, kda_state_grad_products  # noqa: E402

NAMES = ("du", "dh0", "dqg", "dw", "dkd", "dA", "ddl")


def stage_inputs(B, T, H, D, dev, dtype, h0):
    meta = _ChunkMeta(B, T, None, 64, dev)
    TT = B * T
    q, k = (torch.randn(TT, H, D, device=dev, dtype=dtype) for _ in range(2))
    v, g = (torch.randn(TT, H, D, device=dev, dtype=dtype) for _ in range(2))
    beta = torch.randn(TT, H, device=dev, dtype=dtype)
    A_log = torch.empty(H, device=dev).uniform_(1, 16).log()
    dt_bias = torch.randn(H * D, device=dev) * 0.5 - 3
    st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, scale=D**-0.5, A_log=A_log, dt_bias=dt_bias,
                       lower_bound=None, use_qk_l2norm=True, use_beta_sigmoid=True)
    s0 = torch.randn(B, H, D, D, device=dev) * 0.1 if h0 else None
    _, _, h, vnew = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=s0,
                                       output_final_state=False, out_dtype=dtype, store_h=True)
    do = torch.randn(TT, H, D, device=dev, dtype=dtype)
    return meta, st, h, vnew, do


def reference_f64(st, h, vnew, do, B, T):
    """The stage-3 gradients in float64, walking the chunks in reverse (equal-length sequences,
    T a multiple of 64), batched over sequences and heads."""
    NT, BT = T // 64, 64
    HV, K = st["w"].shape[1:]
    V = do.shape[-1]

    def tiles(x):  # [TT, HV, X] -> [B, NT, HV, BT, X]
        return x.double().view(B, NT, BT, HV, -1).transpose(2, 3)

    w, qg, kd, A, vn, dO = (tiles(x) for x in (st["w"], st["qg"], st["kd"], st["Aqk"], vnew, do))
    dl = st["dl"].double().view(B, NT, HV, K)
    S_in = h.double().view(B, NT, HV, K, V)
    tril = torch.ones(BT, BT, device=do.device, dtype=torch.bool).tril()
    out = {n: torch.zeros(B, NT, HV, BT, K, device=do.device, dtype=torch.float64) for n in ("dqg", "dw", "dkd")}
    out["du"] = torch.zeros(B, NT, HV, BT, V, device=do.device, dtype=torch.float64)
    out["dA"] = torch.zeros(B, NT, HV, BT, BT, device=do.device, dtype=torch.float64)
    out["ddl"] = torch.zeros(B, NT, HV, K, device=do.device, dtype=torch.float64)
    dS = torch.zeros(B, HV, K, V, device=do.device, dtype=torch.float64)
    for j in reversed(range(NT)):
        S = S_in[:, j]
        dvn = A[:, j].transpose(-1, -2) @ dO[:, j] + kd[:, j] @ dS
        out["du"][:, j] = dvn
        out["dqg"][:, j] = dO[:, j] @ S.transpose(-1, -2)
        out["dw"][:, j] = -dvn @ S.transpose(-1, -2)
        out["dkd"][:, j] = vn[:, j] @ dS.transpose(-1, -2)
        out["dA"][:, j] = torch.where(tril, dO[:, j] @ vn[:, j].transpose(-1, -2), 0.0)
        out["ddl"][:, j] = (S * dS).sum(-1)
        dS = dl[:, j][..., None] * dS + qg[:, j].transpose(-1, -2) @ dO[:, j] - w[:, j].transpose(-1, -2) @ dvn
    res = {n: x.transpose(2, 3).reshape(B * T, HV, -1) for n, x in out.items() if n != "ddl"}
    res["ddl"] = out["ddl"].reshape(B * NT, HV, K)
    res["dh0"] = dS
    return res


def new_bwd(st, h, vnew, do, meta, chain_kw=None, prod_kw=None):
    dh, dvnew, dh0 = kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, need_dh0=True, **(chain_kw or {}))
    out = kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds, **(prod_kw or {}))
    return dict(out, du=dvnew, dh0=dh0)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def run_shape(B, T, H, D, dev, dtype, *, smoke, quick, say):
    torch.manual_seed(0)
    meta, st, h, vnew, do = stage_inputs(B, T, H, D, dev, dtype, h0=True)
    ref = reference_f64(st, h, vnew, do, B, T)

    def old_bwd():
        return kda_recurrence_bwd(st, h, vnew, do, None, meta.cu, meta.chunk_offsets, need_dh0=True)

    say(f"\n### B{B} T{T} H{H} D{D}, {str(dtype)[6:]} inputs: relative error vs float64")
    try:
        old = old_bwd()
    except Exception as e:  # noqa: BLE001 - e.g. OutOfResources (shared memory) at BV = 64: say so, go on
        old = None
        say(f"single kernel failed: {type(e).__name__}: {str(e)[:200]}")
    new = new_bwd(st, h, vnew, do, meta)
    say("| tensor | single kernel | chain + products |")
    say("|---|---|---|")
    for n in NAMES:
        say(f"| {n} | {rel(old[n], ref[n]) if old else float('nan'):.2e} | {rel(new[n], ref[n]):.2e} |")
    if smoke:
        return
    del ref
    from triton.testing import do_bench

    from hla.bench.timing import copy_bandwidth

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def chain(**kw):
        return kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, need_dh0=True, **kw)

    ceiling = copy_bandwidth(dev) / 1e9
    dh, dvnew, _ = chain()

    def products(**kw):
        return kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds, **kw)

    def nbytes(*xs):
        return sum(x.numel() * x.element_size() for x in xs)

    chain_bytes = nbytes(st["w"], st["qg"], st["kd"], st["Aqk"], st["dl"], do, dh, dvnew)
    prod_bytes = nbytes(h, dh, vnew, dvnew, do, new["dqg"], new["dw"], new["dkd"], new["dA"], new["ddl"])
    t_old = ms(old_bwd) if old else float("nan")
    t_new = ms(lambda: new_bwd(st, h, vnew, do, meta))
    t_chain, t_prod = ms(chain), ms(products)
    say(f"\ncopy ceiling {ceiling:.0f} GB/s (read + write)")
    say("| what | ms | GB/s (% of copy) |")
    say("|---|---|---|")
    say(f"| single kernel kda_recurrence_bwd (+ torch sums) | {t_old:.3f} | |")
    say(f"| chain + products (defaults) | {t_new:.3f} | old / new = {t_old / t_new:.2f}x |")
    say(f"| chain (defaults) | {t_chain:.3f} | {chain_bytes / t_chain / 1e6:.0f} "
        f"({chain_bytes / t_chain / 1e6 / ceiling:.0%}) |")
    say(f"| products (defaults) | {t_prod:.3f} | {prod_bytes / t_prod / 1e6:.0f} "
        f"({prod_bytes / t_prod / 1e6 / ceiling:.0%}) |")
    chain_pts = [(16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 1), (64, 8, 2)]
    prod_pts = [(128, 32, 8, 2), (128, 32, 8, 1), (64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)]
    if quick:
        chain_pts, prod_pts = chain_pts[:4], prod_pts[:3]
    say("\nchain sweep (block_v, num_warps, num_stages): ms")
    for bv, nw, ns in chain_pts:
        say(f"- {bv}, {nw}, {ns}: {ms(lambda: chain(block_v=bv, num_warps=nw, num_stages=ns)):.3f}")  # noqa: B023
    say("\nproducts sweep (block_k, block_v, num_warps, num_stages): ms")
    for bk, bv, nw, ns in prod_pts:
        t = ms(lambda: products(block_k=bk, block_v=bv, num_warps=nw, num_stages=ns))  # noqa: B023
        say(f"- {bk}, {bv}, {nw}, {ns}: {t:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only B1 T8192 H32 D128, fewer sweep points")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, accuracy only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.smoke:
        dev, shapes = torch.device("cpu"), [(1, 128, 2, 32)]
    else:
        dev = torch.device("cuda")
        shapes = [(1, 8192, 32, 128)] if args.quick else [(1, 8192, 32, 128), (4, 8192, 32, 128), (8, 4096, 32, 128)]
        say(f"card: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    for B, T, H, D in shapes:
        run_shape(B, T, H, D, dev, dtype, smoke=args.smoke, quick=args.quick, say=say)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kda_recurrence_bwd.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
