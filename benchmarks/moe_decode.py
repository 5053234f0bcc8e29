"""Routed experts of the 48B MoE at decode token counts: the Triton path vs the old torch paths.

Question: for N = 1..64 decode tokens (top-8 of 256 experts, expert width 1024, hidden 2304, bf16),
how long does one MoE layer take with the Triton decode path (reads only the chosen experts, by
index) vs ``_gathered`` (copies each pair's expert weights) and ``_padded`` (runs all 256 experts)?
And how close does the Triton path come to reading the unique chosen experts' bytes at the card's
copy bandwidth, measured in the same run?

Also checks the Triton path in bf16 against the float64 per-token reference at those shapes.
Routing for the routed-only rows: ``k`` distinct uniform random experts per token. Every timing is
a CUDA graph replay (median of ``triton.testing.do_bench``), after eager warm-up (autotuning).

    python benchmarks/moe_decode.py --out moe_decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import types
from functools import partial

import torch
import triton

import hla.layers.moe as moe_layer
from hla.bench.timing import copy_bandwidth, cuda_graph_replay
from hla.models.config import KimiLinearConfig
from hla.ops.moe import moe_experts_decode, moe_experts_reference


def _ms(fn) -> float:
    try:
        return triton.testing.do_bench(cuda_graph_replay(fn), warmup=25, rep=200, return_mode="median")
    except Exception as e:  # noqa: BLE001 -- report a path that cannot be captured instead of dying
        print(f"  graph failed ({type(e).__name__}: {e}); timing eagerly")
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_gbps() -> float:
    return copy_bandwidth("cuda") / 1e9  # read + written bytes per second, GB/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = KimiLinearConfig()  # the 48B: E=256, k=8, I=1024, d=2304
    dev, dt = "cuda", torch.bfloat16
    layer = moe_layer.SparseMoE(cfg).to(dev)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0.0, 0.02)
            if name == "gate.e_score_correction_bias":
                p.zero_()
    for name, p in layer.named_parameters():
        if name not in ("gate.weight", "gate.e_score_correction_bias"):
            p.data = p.data.to(dt)
    E, k = layer.num_experts, layer.top_k
    ex = layer.experts
    I, D = ex.w1.shape[1], ex.w1.shape[2]
    expert_bytes = 3 * I * D * ex.w1.element_size()
    shim = types.SimpleNamespace(experts=ex, num_experts=E)
    ceiling = copy_gbps()
    card = torch.cuda.get_device_name()
    print(f"{card}; E={E} k={k} I={I} d={D}; copy ceiling {ceiling:.0f} GB/s (read+write)")
    rows = []
    with torch.no_grad():
        for N in args.tokens:
            x = torch.randn(N, D, device=dev, dtype=dt)
            idx = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(N)])
            wt = torch.rand(N, k, device=dev)
            wt = wt / wt.sum(-1, keepdim=True) * cfg.routed_scaling_factor
            out = moe_experts_decode(x, ex.w1, ex.w3, ex.w2, idx, wt)
            ref = moe_experts_reference(x.double(), ex.w1, ex.w3, ex.w2, idx, wt.double())
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            unique = int(torch.unique(idx).numel())
            t_triton = _ms(partial(moe_experts_decode, x, ex.w1, ex.w3, ex.w2, idx, wt))
            t_gath = _ms(partial(moe_layer.SparseMoE._gathered, shim, x, idx, wt))
            t_pad = _ms(partial(moe_layer.SparseMoE._padded, shim, x, idx, wt))
            # Whole layer (router + routed + shared expert) with the gate's own routing.
            xl = torch.randn(N, 1, D, device=dev, dtype=dt)
            t_layer = _ms(partial(layer, xl))
            saved = moe_layer.MOE_DECODE_MAX_PAIRS
            moe_layer.MOE_DECODE_MAX_PAIRS = 0  # the old dispatch: gathered <= 16 pairs, else padded
            try:
                t_layer_old = _ms(partial(layer, xl))
            finally:
                moe_layer.MOE_DECODE_MAX_PAIRS = saved
            gbps = unique * expert_bytes / t_triton / 1e6
            row = dict(
                N=N, pairs=N * k, unique_experts=unique, rel_err_bf16_vs_f64=rel,
                ms_triton=t_triton, ms_gathered=t_gath, ms_padded=t_pad,
                ms_layer_triton=t_layer, ms_layer_old=t_layer_old,
                unique_gb=unique * expert_bytes / 1e9, gbps_unique_triton=gbps,
                frac_copy_ceiling=gbps / ceiling,
            )
            rows.append(row)
            print(json.dumps(row))
    res = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               torch=torch.__version__, triton=triton.__version__, copy_gbps=ceiling,
               E=E, k=k, I=I, d=D, rows=rows)
    print("\n| N | pairs | unique experts | rel err (bf16 vs f64) | Triton ms | gathered ms | padded ms "
          "| layer new ms | layer old ms | unique GB/s (Triton) | of copy |")
    print("|" + " --- |" * 11)
    for r in rows:
        print(f"| {r['N']} | {r['pairs']} | {r['unique_experts']} | {r['rel_err_bf16_vs_f64']:.2e} "
              f"| {r['ms_triton']:.3f} | {r['ms_gathered']:.3f} | {r['ms_padded']:.3f} "
              f"| {r['ms_layer_triton']:.3f} | {r['ms_layer_old']:.3f} | {r['gbps_unique_triton']:.0f} "
              f"| {r['frac_copy_ceiling']:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
