"""Model-level GPU check: a ~1.37B Kimi Linear forward+backward in bf16 vs the fp32 path, tokens/s,
plus cached prefill/decode agreement and a no-host-sync check of the decode step.

Usage (on a CUDA machine):  PYTHONPATH=src python3 benchmarks/model_gpu.py [--seq 2048] [--out results.json]

What it measures, all on the same random weights (preset "1b", seed 0):
  1. fp32 reference: forward + backward with the torch KDA path, fp32 weights.
  2. bf16 forward + backward with each available KDA backend ("triton" if importable, and "torch"):
     relative error of logits, loss and weight gradients vs (1), and tokens/s of fwd+bwd (median
     of timed iterations after warm-up, CUDA events), with an MFU estimate from 6 * params * tokens.
  3. bf16 cache: prefill 512 + 15 decode steps vs one full forward (relative error of logits) and
     the eager decode-step time at batch 1 (not a tuned decode benchmark: no CUDA graph).
  4. torch.cuda.set_sync_debug_mode("error") around a decode step: dense 1b and a small MoE model
     at batch 1 (gathered experts) and batch 16 (padded experts) must not synchronise.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from hla.generation.cache import HybridCache
from hla.layers.kda import KimiDeltaAttention
from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def set_backend(model: KimiLinearForCausalLM, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, KimiDeltaAttention):
            m.kda_backend = backend


def fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def triton_available() -> bool:
    try:
        import hla.ops.kda.triton  # noqa: F401
    except ImportError:
        return False
    return True


GRAD_PARAMS = (
    "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.A_log",
    "model.layers.0.self_attn.dt_bias", "model.layers.0.self_attn.f_b_proj.weight",
    "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.12.mlp.down_proj.weight", "lm_head.weight",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--preset", default="1b", help="model preset (tiny for a CPU smoke run)")
    ap.add_argument("--round-weights", action="store_true",
                    help="round the fp32 reference's weights to bf16 first, so only compute precision differs")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "preset": args.preset,
                 "torch": torch.__version__, "seq": args.seq,
                 "batch": args.batch, "triton_kda": triton_available()}
    print(res, flush=True)

    torch.manual_seed(0)
    cfg = KimiLinearConfig.preset(args.preset)
    with torch.device(dev):
        ref = KimiLinearForCausalLM(cfg)  # fp32
    n_params = ref.num_parameters()
    res["params"] = n_params
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)

    if args.round_weights:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name not in ref.fp32_param_names():
                    p.copy_(p.to(torch.bfloat16).float())
    res["reference_weights"] = "bf16-rounded" if args.round_weights else "fp32"
    set_backend(ref, "torch")
    t0 = time.time()
    out = fwd_bwd(ref, ids)
    sync()
    ref_logits, ref_loss = out.logits.detach().float(), out.loss.item()
    ref_grads = {n: p.grad.detach().float().clone() for n, p in ref.named_parameters() if n in GRAD_PARAMS}
    res["fp32_torch_first_call_s"] = time.time() - t0
    res["fp32_loss"] = ref_loss
    del out
    ref.zero_grad(set_to_none=True)

    bf = copy.deepcopy(ref).to_dtype(torch.bfloat16)
    del ref
    tokens = args.batch * args.seq
    backends = (["triton"] if res["triton_kda"] else []) + ["torch"]
    peak_flops = 989e12  # H100 SXM dense bf16; H200 has the same tensor cores
    for backend in backends:
        set_backend(bf, backend)
        out = fwd_bwd(bf, ids)
        entry = {
            "logits_rel": rel(out.logits.float(), ref_logits),
            "loss": out.loss.item(),
            "loss_rel": abs(out.loss.item() - ref_loss) / abs(ref_loss),
            "grad_rel": {n: rel(p.grad.float(), ref_grads[n]) for n, p in bf.named_parameters() if n in GRAD_PARAMS},
        }
        del out
        sec = timed(lambda: fwd_bwd(bf, ids))
        entry["fwd_bwd_s"] = sec
        entry["tokens_per_s"] = tokens / sec
        entry["mfu_6N"] = 6 * n_params * tokens / sec / peak_flops
        fwd = timed(lambda: bf(ids))
        entry["fwd_s"] = fwd
        entry["fwd_tokens_per_s"] = tokens / fwd
        res[f"bf16_{backend}"] = entry
        print(backend, json.dumps(entry), flush=True)
    bf.zero_grad(set_to_none=True)

    # Cached prefill + decode vs the full forward (bf16, default backend).
    set_backend(bf, "auto")
    with torch.no_grad():
        seq = torch.randint(0, cfg.vocab_size, (1, 527), device=dev)
        full = bf(seq).logits.float()
        cache = HybridCache.allocate(cfg, 1, 1024, device=dev, dtype=torch.bfloat16)
        parts = [bf(seq[:, :512], cache=cache).logits.float()]
        for t in range(512, 527):
            parts.append(bf(seq[:, t:t + 1], cache=cache).logits.float())
        res["cache_vs_full_logits_rel"] = rel(torch.cat(parts, 1), full)
        res["cache_vs_full_decode_rel"] = rel(torch.cat(parts[1:], 1), full[:, 512:])
        step = seq[:, -1:]
        res["decode_step_eager_ms"] = 1e3 * timed(lambda: bf(step, cache=cache), warmup=3, iters=20)
        # The timing loop advanced the cache; it has room (1024) for those steps.
    print("cache", res["cache_vs_full_logits_rel"], res["decode_step_eager_ms"], flush=True)
    if dev.type == "cuda":
        res["decode_no_host_sync"] = no_sync_checks(bf, cfg, seq, dev)
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


def no_sync_checks(bf, cfg, seq, dev) -> dict:
    """torch.cuda.set_sync_debug_mode("error") around decode steps of the dense and a MoE model."""
    sync = {}
    with torch.no_grad():
        cache = HybridCache.allocate(cfg, 1, 64, device=dev, dtype=torch.bfloat16)
        bf(seq[:, :8], cache=cache)
        sync["1b_b1"] = _no_sync(lambda: bf(seq[:, 8:9], cache=cache))
        moe_cfg = KimiLinearConfig.preset("small").replace(dtype="bfloat16")
        with torch.device(dev):
            moe = KimiLinearForCausalLM(moe_cfg).to_dtype(torch.bfloat16).eval()
        for B in (1, 16):
            cache = HybridCache.allocate(moe_cfg, B, 64, device=dev, dtype=torch.bfloat16)
            x = torch.randint(0, 256, (B, 9), device=dev)
            moe(x[:, :8], cache=cache)
            sync[f"moe_small_b{B}"] = _no_sync(lambda x=x, cache=cache: moe(x[:, 8:9], cache=cache))
    return sync


def _no_sync(fn) -> str:
    fn()  # warm-up outside the check (first calls may compile or allocate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "ok"
    except RuntimeError as err:
        return f"SYNC: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
