"""Absorbed MLA decode attention at the 48B shapes: the Triton flash-decoding kernel vs the einsums.

Question: for one MLA layer of Kimi-Linear-48B (H = 32 heads, kv_lora_rank R = 512, rope dim 64,
bf16 latent cache) at batch 1 and 4 and 128K / 1M cached tokens, how long does the attention of
one decode token take with ``hla.ops.mla.mla_decode`` vs the einsum path of
``MultiheadLatentAttention._absorbed``, and what fraction of the card's copy bandwidth (measured
in the same run) does the kernel reach reading the latent + k_pe once?

- ``kernel``: ``mla_decode`` alone (q_lat given).
- ``layer attn``: what ``forward`` runs between the cache write and the gate: Triton =
  ``_absorbed(..., lengths=...)``; einsum = the ``[B, T, S]`` mask + ``_absorbed(..., mask)``.
Every timing is a CUDA graph replay (median of ``triton.testing.do_bench``) after eager warm-up
(autotuning), so the graph capture is tested too. Also checks bf16 against the float64 reference.

    python benchmarks/mla_decode.py --out mla_decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

import hla.ops.mla.decode_triton as dtr
from hla.bench.timing import copy_bandwidth, cuda_graph_replay
from hla.layers.mla import MultiheadLatentAttention
from hla.models.config import KimiLinearConfig
from hla.ops.mla import mla_decode, mla_decode_reference


def _ms(fn) -> tuple[float, str]:
    try:
        return triton.testing.do_bench(cuda_graph_replay(fn), warmup=10, rep=100, return_mode="median"), "graph"
    except Exception as e:  # noqa: BLE001 -- report a path that cannot be captured instead of dying
        print(f"  graph failed ({type(e).__name__}: {e}); timing eagerly")
        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"), "eager"


def copy_gbps() -> float:
    return copy_bandwidth("cuda") / 1e9  # read + written bytes per second, GB/s


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _time_point(layer, B: int, S: int, ceiling: float) -> dict:
    dev, dt, T = "cuda", torch.bfloat16, 1
    H, R, DR, DN = layer.num_heads, layer.kv_lora_rank, layer.rope_dim, layer.nope_dim
    lat = torch.randn(B, S, R, device=dev, dtype=dt)
    kpe = torch.randn(B, S, DR, device=dev, dtype=dt)
    lengths = torch.full((B,), S - 1, device=dev, dtype=torch.long)
    q_nope = torch.randn(B, T, H, DN, device=dev, dtype=dt)
    q_pe = torch.randn(B, T, H, DR, device=dev, dtype=dt)
    q_lat = torch.randn(B, T, H, R, device=dev, dtype=dt)
    pos = lengths[:, None] + torch.arange(T, device=dev)
    nbytes = B * S * (R + DR) * lat.element_size()
    row = {"B": B, "S": S}

    def einsum_attn():
        m = torch.arange(S, device=dev)[None, None, :] <= pos[:, :, None]
        return layer._absorbed(q_nope, q_pe, lat, kpe, m)

    def triton_attn():
        return layer._absorbed(q_nope, q_pe, lat, kpe, None, lengths=lengths)

    def kernel():
        return mla_decode(q_lat, q_pe, lat, kpe, lengths, S, layer.scale)

    with torch.no_grad():
        row["layer_rel_diff"] = _rel(triton_attn(), einsum_attn())
        row["kernel_ms"], row["kernel_mode"] = _ms(kernel)
        row["triton_attn_ms"], _ = _ms(triton_attn)
        try:
            row["einsum_attn_ms"], _ = _ms(einsum_attn)
        except torch.cuda.OutOfMemoryError:
            row["einsum_attn_ms"] = None
    row["kernel_gbps"] = nbytes / row["kernel_ms"] / 1e6
    row["kernel_frac_of_copy"] = row["kernel_gbps"] / ceiling
    row["floor_ms"] = nbytes / ceiling / 1e6
    if row["einsum_attn_ms"]:
        row["speedup_attn"] = row["einsum_attn_ms"] / row["triton_attn_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128 * 1024, 1024 * 1024])
    ap.add_argument("--waves", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="also time the kernel alone at these programs-per-SM (split counts)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    cfg = KimiLinearConfig()  # the 48B: H = 32, R = 512, dr = 64, dn = dv = 128
    idx = next(i for i in range(cfg.num_hidden_layers) if cfg.is_mla_layer(i))
    layer = MultiheadLatentAttention(cfg, idx).to(dev)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    layer = layer.to(dt)
    H, R, DR = layer.num_heads, layer.kv_lora_rank, layer.rope_dim
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "torch": torch.__version__, "triton": triton.__version__, "check": [], "timing": []}
    print(res["device"], res["date"])

    # (a) bf16 vs float64 reference at the 48B shapes, rows of different lengths.
    for B, S, T in [(1, 1024 * 1024, 1), (4, 256 * 1024, 1), (4, 256 * 1024, 2)]:
        lengths = torch.tensor([S - T - 1000 * b for b in range(B)], device=dev)
        q_lat = torch.randn(B, T, H, R, device=dev, dtype=dt)
        q_pe = torch.randn(B, T, H, DR, device=dev, dtype=dt)
        lat = torch.randn(B, S, R, device=dev, dtype=dt)
        kpe = torch.randn(B, S, DR, device=dev, dtype=dt)
        for b in range(B):  # stale NaN past each row's length must not leak
            lat[b, int(lengths[b]) + T:] = float("nan")
            kpe[b, int(lengths[b]) + T:] = float("nan")
        scale = layer.scale
        out = mla_decode(q_lat, q_pe, lat, kpe, lengths, S, scale)
        torch.cuda.synchronize()
        lat64 = torch.nan_to_num(lat.double(), nan=0.0)
        kpe64 = torch.nan_to_num(kpe.double(), nan=0.0)
        ref = mla_decode_reference(q_lat.double(), q_pe.double(), lat64, kpe64, lengths, S, scale)
        row = {"B": B, "S": S, "T": T, "rel_err_vs_f64": _rel(out, ref), "finite": bool(torch.isfinite(out).all())}
        del lat64, kpe64, ref, lat, kpe
        torch.cuda.empty_cache()
        print("check", row)
        res["check"].append(row)

    ceiling = copy_gbps()
    res["copy_gbps"] = ceiling
    print(f"copy bandwidth {ceiling:.0f} GB/s")

    # (b) timings, T = 1, every row full (lengths = S - 1: the new token is the last slot).
    for S in args.contexts:
        for B in args.batches:
            row = _time_point(layer, B, S, ceiling)
            print("time", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            res["timing"].append(row)
            torch.cuda.empty_cache()
    res["best_config"] = str(dtr.mla_decode_split_kernel.best_config)
    print("autotuned config:", res["best_config"])
    # Kernel alone vs the split count; the 'best_waves' (lowest summed time) is printed for reuse.
    default_waves, total = dtr.WAVES, {}
    res["waves"] = []
    for w in args.waves:
        dtr.WAVES = w
        for S in args.contexts:
            for B in args.batches:
                lat = torch.randn(B, S, R, device=dev, dtype=dt)
                kpe = torch.randn(B, S, DR, device=dev, dtype=dt)
                lengths = torch.full((B,), S - 1, device=dev, dtype=torch.long)
                q_lat = torch.randn(B, 1, H, R, device=dev, dtype=dt)
                q_pe = torch.randn(B, 1, H, DR, device=dev, dtype=dt)
                ms, _ = _ms(lambda: mla_decode(q_lat, q_pe, lat, kpe, lengths, S, layer.scale))  # noqa: B023
                gbps = B * S * (R + DR) * 2 / ms / 1e6
                total[w] = total.get(w, 0.0) + ms / (B * S)
                row = {"waves": w, "B": B, "S": S, "kernel_ms": ms, "frac_of_copy": gbps / ceiling}
                print("waves", row)
                res["waves"].append(row)
    dtr.WAVES = default_waves
    if total:
        res["best_waves"] = min(total, key=total.get)
        print("best_waves", res["best_waves"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
