"""KDA kernels, ours (hla.ops.kda.triton) against FLA 0.6.0, in one run on one card.

Chunked prefill: forward and forward+backward at (B, T, H, D) = (1, 8192, 32, 128),
(4, 8192, 32, 128), (1, 32768, 32, 128), (1, 8192, 96, 128), for the unbounded Kimi gate and the
bounded gate (lower_bound = -5; FLA with safe_gate=True). Both sides take bf16 raw projections and
fuse gate, l2norm and beta-sigmoid in-kernel. Decode: one step inside a CUDA graph at batch 1, 8,
64, 256 (H = 32, D = 128), state pool in place, GB/s of fp32 state read + write against the copy
ceiling measured here. Prints a markdown table; with --out DIR also writes it there.

    PYTHONPATH=src python3 benchmarks/kda_kernels.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton
from triton.testing import do_bench

from hla.bench.timing import copy_bandwidth
from hla.ops.kda.triton import kda_chunk_triton, kda_decode_triton

try:
    from fla.ops.kda import chunk_kda as fla_chunk_kda
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_recurrent_fwd
except Exception as e:  # noqa: BLE001 - any import failure means "no peer in this run"
    print(f"FLA not importable ({type(e).__name__}: {e}); peer columns will be empty", file=sys.stderr)
    fla_chunk_kda = fla_recurrent_fwd = None

DEV = torch.device("cuda")


def ms(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=25, rep=120, grad_to_none=grad_to_none, return_mode="median")


def copy_ceiling() -> float:
    return copy_bandwidth(DEV) / 1e9


def gemm_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = ms(lambda: a @ b)
    return 2 * n**3 / (t * 1e-3) / 1e12


def prefill_inputs(B, T, H, D, gate):
    bf = torch.bfloat16
    x = dict(
        q=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        k=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        v=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        g=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        beta=torch.randn(B, T, H, device=DEV, dtype=bf),
        A_log=torch.empty(H, device=DEV).uniform_(1, 16).log(),
        dt_bias=torch.randn(H * D, device=DEV) * 0.5 - 3,
    )
    x["lower_bound"] = -5.0 if gate == "safe" else None
    return x


def ours_fwd(x):
    return kda_chunk_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=x["q"].shape[-1] ** -0.5,
                            initial_state=None, output_final_state=False, cu_seqlens=None, A_log=x["A_log"],
                            dt_bias=x["dt_bias"], lower_bound=x["lower_bound"], use_qk_l2norm=True,
                            use_beta_sigmoid=True, chunk_size=64)[0]


def fla_fwd(x):
    return fla_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                         safe_gate=x["lower_bound"] is not None, lower_bound=x["lower_bound"])[0]


def time_prefill(fwd, x, backward=True):
    with torch.no_grad():
        t_f = ms(lambda: fwd(x))
    if not backward:
        return t_f, float("nan")
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    for t in leaves:
        t.requires_grad_(True)
    do = torch.randn_like(x["v"])

    def step():
        fwd(x).backward(do)

    t_fb = ms(step, grad_to_none=leaves)
    for t in leaves:
        t.requires_grad_(False)
        t.grad = None
    return t_f, t_fb


def decode_inputs(B, H, D, sets):
    bf = torch.bfloat16
    steps = []
    for i in range(sets):
        steps.append(dict(
            q=torch.randn(B, 1, H, D, device=DEV, dtype=bf), k=torch.randn(B, 1, H, D, device=DEV, dtype=bf),
            v=torch.randn(B, 1, H, D, device=DEV, dtype=bf), g=torch.randn(B, 1, H, D, device=DEV, dtype=bf),
            beta=torch.randn(B, 1, H, device=DEV, dtype=bf),
            idx=torch.arange(i * B, (i + 1) * B, device=DEV, dtype=torch.int32),
        ))
    pool = torch.randn(sets * B, H, D, D, device=DEV) * 0.05
    A_log = torch.empty(H, device=DEV).uniform_(1, 16).log()
    dt_bias = torch.randn(H * D, device=DEV) * 0.5 - 3
    return steps, pool, A_log, dt_bias


def time_graph(call, steps) -> float:
    """One decode step's time: `len(steps)` steps (each on its own pool slots, so the state does not
    sit in L2) captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for st in steps:
            call(st)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for st in steps:
            call(st)
    return ms(graph.replay) / len(steps)


def bench_decode(B, H, D, block_v=None):
    sets = max(4, min(16, math.ceil(256 / B)))
    steps, pool, A_log, dt_bias = decode_inputs(B, H, D, sets)

    def ours(st):
        kda_decode_triton(st["q"], st["k"], st["v"], st["g"], st["beta"], pool, scale=D**-0.5,
                          state_indices=st["idx"], A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=True,
                          use_beta_sigmoid=True, block_v=block_v)

    def fla(st):
        fla_recurrent_fwd(st["q"], st["k"], st["v"], st["g"], st["beta"], A_log=A_log, dt_bias=dt_bias,
                          scale=D**-0.5, initial_state=pool, inplace_final_state=True,
                          ssm_state_indices=st["idx"], use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                          use_beta_sigmoid_in_kernel=True)

    t_ours = time_graph(ours, steps)
    t_fla = time_graph(fla, steps) if fla_recurrent_fwd is not None else float("nan")
    nbytes = B * H * D * D * 4 * 2
    return t_ours, t_fla, nbytes


def profile_stages(B=1, T=8192, H=32, D=128) -> list[str]:
    """Time each forward stage alone (Kimi gate) and the recurrence at each value-block width."""
    from hla.ops.kda.triton import chunk as C
    from hla.ops.kda.triton import recurrence as R

    x = prefill_inputs(B, T, H, D, "kimi")
    meta = C._ChunkMeta(B, T, None, 64, DEV)
    f = [x[n].reshape(B * T, *x[n].shape[2:]) for n in ("q", "k", "v", "g", "beta")]
    intra = lambda: C.kda_intra_fwd(*f, meta.chunk_bounds, scale=D**-0.5, A_log=x["A_log"], dt_bias=x["dt_bias"],
                                    lower_bound=None, use_qk_l2norm=True, use_beta_sigmoid=True)
    st = intra()
    out = [f"stage intra {ms(intra):.3f} ms"]
    for bv in (16, 32, 64):
        rec = lambda bv=bv: R.kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=None,
                                                 output_final_state=False, out_dtype=torch.bfloat16, block_v=bv)
        out.append(f"stage recurrence BV={bv} {ms(rec):.3f} ms")
    _, _, h, vnew = R.kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=None,
                                         output_final_state=False, out_dtype=torch.bfloat16, store_h=True)
    do = torch.randn_like(f[2])
    rb = lambda: R.kda_recurrence_bwd(st, h, vnew, do, None, meta.cu, meta.chunk_offsets, need_dh0=False)
    out.append(f"stage recurrence_bwd {ms(rb):.3f} ms")
    for line in out:
        print(line, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--fwd-only-after", type=int, default=99, help="time fwd+bwd for the first N shapes only")
    args = ap.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    fla_ver = getattr(sys.modules.get("fla"), "__version__", "not importable")
    head = (f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, FLA {fla_ver}; "
            f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"command: PYTHONPATH=src python3 benchmarks/kda_kernels.py")
    print(head, flush=True)
    bw = copy_ceiling()
    tf = gemm_ceiling()
    print(f"copy ceiling {bw:.0f} GB/s (read+write), bf16 GEMM 8192^3 {tf:.0f} TFLOP/s", flush=True)
    prof = profile_stages()
    rows = []
    shapes = [(1, 8192, 32, 128), (4, 8192, 32, 128), (1, 32768, 32, 128), (1, 8192, 96, 128)]
    if args.quick:
        shapes = shapes[:1]
    for i_s, (B, T, H, D) in enumerate(shapes):
        for gate in ("kimi", "safe"):
            x = prefill_inputs(B, T, H, D, gate)
            bwd = i_s < args.fwd_only_after
            of, ofb = time_prefill(ours_fwd, x, bwd)
            ff, ffb = time_prefill(fla_fwd, x, bwd) if fla_chunk_kda is not None else (float("nan"),) * 2
            rows.append(dict(kind="prefill", B=B, T=T, H=H, D=D, gate=gate, ours_fwd=of, fla_fwd=ff,
                             ours_fb=ofb, fla_fb=ffb))
            print(f"B{B} T{T} H{H} D{D} {gate:5}: fwd ours {of:.3f} ms FLA {ff:.3f} ms ({ff / of:.2f}x) | "
                  f"fwd+bwd ours {ofb:.3f} ms FLA {ffb:.3f} ms ({ffb / ofb:.2f}x)", flush=True)
            del x
            torch.cuda.empty_cache()
    drows = []
    for B in (1, 8, 64, 256):
        to, tfla, nb = bench_decode(B, 32, 128)
        drows.append(dict(kind="decode", B=B, ours_us=to * 1e3, fla_us=tfla * 1e3, bytes=nb,
                          ours_gbs=nb / (to * 1e-3) / 1e9, fla_gbs=nb / (tfla * 1e-3) / 1e9))
        d = drows[-1]
        print(f"decode B{B}: ours {d['ours_us']:.1f} us ({d['ours_gbs']:.0f} GB/s, {d['ours_gbs'] / bw:.0%} of copy) "
              f"FLA {d['fla_us']:.1f} us ({d['fla_gbs']:.0f} GB/s, {d['fla_gbs'] / bw:.0%})", flush=True)
    sweep = []
    for B, bv, nw in [(1, 16, 1), (1, 16, 2), (1, 32, 2), (64, 32, 2), (64, 32, 4), (64, 64, 4),
                      (64, 64, 8), (64, 128, 8), (256, 64, 4), (256, 64, 8), (256, 32, 4)]:
        sets = max(4, min(16, math.ceil(256 / B)))
        steps, pool, A_log, dt_bias = decode_inputs(B, 32, 128, sets)

        def call(st, pool=pool, A_log=A_log, dt_bias=dt_bias, bv=bv, nw=nw):
            kda_decode_triton(st["q"], st["k"], st["v"], st["g"], st["beta"], pool, scale=128**-0.5,
                              state_indices=st["idx"], A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=True,
                              use_beta_sigmoid=True, block_v=bv, num_warps=nw)

        t = time_graph(call, steps)
        sweep.append(dict(B=B, BV=bv, nw=nw, us=t * 1e3))
        print(f"  decode sweep B{B} BV{bv} warps{nw}: {t * 1e3:.1f} us", flush=True)

    lines = [head, "", f"Copy ceiling {bw:.0f} GB/s (read+write of a 1 GiB fp32 buffer); bf16 GEMM 8192^3 "
             f"{tf:.0f} TFLOP/s.", "",
             "| B | T | H | D | gate | fwd ours ms | fwd FLA ms | fwd speedup | fwd+bwd ours ms | fwd+bwd FLA ms "
             "| fwd+bwd speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['gate']} | {r['ours_fwd']:.3f} | "
                     f"{r['fla_fwd']:.3f} | {r['fla_fwd'] / r['ours_fwd']:.2f}x | {r['ours_fb']:.3f} | "
                     f"{r['fla_fb']:.3f} | {r['fla_fb'] / r['ours_fb']:.2f}x |")
    lines += ["", "Decode step (T=1, H=32, D=128, fp32 state pool in place, CUDA graph):", "",
              "| batch | ours us | ours GB/s | ours % copy | FLA us | FLA GB/s | FLA % copy | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for d in drows:
        lines.append(f"| {d['B']} | {d['ours_us']:.1f} | {d['ours_gbs']:.0f} | {d['ours_gbs'] / bw:.0%} | "
                     f"{d['fla_us']:.1f} | {d['fla_gbs']:.0f} | {d['fla_gbs'] / bw:.0%} | "
                     f"{d['fla_us'] / d['ours_us']:.2f}x |")
    if prof:
        lines += ["", "Stage profile (B1 T8192 H32 D128, Kimi gate):", ""] + [f"- {p}" for p in prof]
    if sweep:
        lines += ["", "Decode value-block sweep (us): " + ", ".join(f"B{d['B']}/BV{d['BV']}/w{d['nw']}={d['us']:.1f}"
                                                               for d in sweep)]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kda_kernels.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "kda_kernels.json"), "w") as f:
            json.dump(dict(card=card, copy_gbs=bw, gemm_tflops=tf, prefill=rows, decode=drows, sweep=sweep), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
