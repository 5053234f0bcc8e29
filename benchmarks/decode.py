"""Decode speed of a ~1B Kimi Linear model: time per step, eager vs CUDA graph, vs the bandwidth floor.

Question: how close does one decode step (``model(ids [B, 1], cache=cache)``) come to the time it
takes just to read the weights (and the cache) once at the card's copy bandwidth, at batch 1 and
64, context 4K and 64K? And how does it compare with transformers' own Kimi Linear (with FLA) on
the same config and card?

The cache is filled with **random** latents, conv windows and fp32 states and its lengths set to
the context: decode time does not depend on the values, and this skips a 64K-token prefill per
row. The peer is measured after a real prefill (batch 1, 4K) since its cache cannot be faked
through a public API. Sampling is not timed (a separate, tiny cost); each step feeds fixed
random token ids.

    python benchmarks/decode.py --out benchmarks/results/decode.md [--peer]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

from hla.generation.bench import (
    build_random_model,
    compile_small_modules,
    copy_bandwidth,
    decode_breakdown,
    fill_random,
    free_memory,
    streamed_weight_bytes,
    time_decode,
)


def cache_bytes_read(config, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes a decode step must touch in the cache: every latent once, each KDA state read and written."""
    from hla.generation.cache import predict_cache_bytes

    p = predict_cache_bytes(config, batch, context, dtype=dtype)
    return p["mla_latent"] + 2 * p["kda_state"] + 2 * p["kda_conv"]


def bench_ours(model, batch: int, context: int, steps: int, dtype: torch.dtype, device, breakdown: bool,
               modes=("eager", "graph")) -> dict:
    from hla.generation.cache import HybridCache
    from hla.generation.graph import DecodeRunner

    config = model.config
    out = {"batch": batch, "context": context}
    # Enough slots for eager and graph runs (each with warm-up) after the filled context.
    max_length = -(-(context + 2 * (steps + 8)) // 64) * 64  # aligned, as generate() allocates
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    for mode in modes if device.type == "cuda" else ("eager",):
        cache = HybridCache.allocate(config, batch, max_length, device=device, dtype=dtype)
        fill_random(cache, context)
        out["cache_bytes"] = cache.nbytes()
        runner = DecodeRunner(model, cache, use_graph=(mode == "graph"))
        out[mode] = time_decode(runner, ids, steps if mode == "graph" else max(steps // 4, 8), warmup=4)
        out[f"{mode}_captured"] = runner.captured
        del runner, cache
        free_memory(device)
    if "graph" not in out and "graph" in modes:
        out["graph"], out["graph_captured"] = float("nan"), False
    if breakdown and device.type == "cuda":
        cache = HybridCache.allocate(config, batch, max_length, device=device, dtype=dtype)
        fill_random(cache, context)
        out["breakdown"] = decode_breakdown(model, cache, ids)
        del cache
        free_memory(device)
    return out


def _hf_config(config):
    """transformers' KimiLinearConfig from our (release-named) fields; unknown keys are dropped one by one."""
    from transformers import KimiLinearConfig as HFConfig

    d = {k: v for k, v in config.to_dict().items() if v is not None}
    for k in ("kv_a_layernorm_eps", "moe_biased_weights", "kda_lower_bound", "dtype", "architectures"):
        d.pop(k, None)
    if not config.num_experts:
        d["num_experts"] = 1  # unused: first_k_dense_replace covers every layer
    for _ in range(30):
        try:
            return HFConfig(**d)
        except TypeError as e:
            bad = str(e).split("'")[1] if "'" in str(e) else None
            if bad not in d:
                raise
            d.pop(bad)
    raise RuntimeError("could not build transformers' KimiLinearConfig")


@torch.no_grad()
def bench_peer(config, context: int, steps: int, dtype: torch.dtype, device) -> dict:
    """transformers' native Kimi Linear: prefill ``context`` random tokens, then time decode steps (batch 1)."""
    import transformers
    from transformers import KimiLinearForCausalLM as HFModel

    out = {"batch": 1, "context": context, "transformers": transformers.__version__}
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        out["fla"] = None
    import importlib.util

    out["causal_conv1d"] = importlib.util.find_spec("causal_conv1d") is not None
    hf_config = _hf_config(config)
    with torch.device(device):
        model = HFModel(hf_config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, context), device=device)
    t0 = time.perf_counter()
    res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    out["prefill_s"] = time.perf_counter() - t0
    past = res.past_key_values
    nxt = res.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        res = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["step_s"] = sorted(times[2:])[len(times[2:]) // 2]
    del model, past, res
    free_memory(device)
    return out


def render(meta: dict, rows: list[dict], peer: dict | None) -> str:
    ms = lambda s: f"{s * 1e3:.3f}"
    lines = [
        "## Decode speed (benchmarks/decode.py)",
        "",
        f"Card: {meta['card']}; date {meta['date']}; torch {meta['torch']}; config `{meta['preset']}` "
        f"({meta['params'] / 1e9:.2f} B parameters, {meta['dtype']}), schedule {meta['schedule']}, "
        f"KDA kernels: {meta.get('kda_backend', '?')}.",
        f"Command: `{meta['command']}`",
        "",
        "The cache is filled with random latents/states (lengths set to the context) instead of a prefill;",
        "decode time does not depend on the values. Floor = bytes a step must read (weights without the",
        f"embedding table: {meta['weight_bytes'] / 1e9:.2f} GB, plus the cache) / measured copy bandwidth "
        f"{meta['copy_bw'] / 1e12:.2f} TB/s.",
        "",
        "| batch | context | eager ms/step | graph ms/step | graph tokens/s | cache GB | floor ms "
        "(weights only) | floor ms (weights+cache) | eager / floor | graph / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['context']} | {ms(r['eager'])} | {ms(r['graph'])} | "
            f"{r['batch'] / r['graph']:.0f} | {r['cache_bytes'] / 1e9:.2f} | {ms(r['floor_weights'])} | "
            f"{ms(r['floor'])} | {r['eager'] / r['floor']:.1f}x | {r['graph'] / r['floor']:.2f}x |"
        )
    lines.append("")
    cr = [r for r in rows if r.get("graph_compiled")]
    if cr:
        lines += ["With `torch.compile` on the norms, short convolutions and MLPs (`--compile`; mixers eager), "
                  "graph ms/step: " + "; ".join(
                      f"batch {r['batch']} ctx {r['context']}: {ms(r['graph_compiled'])} "
                      f"({r['graph_compiled'] / r['floor']:.2f}x floor)" for r in cr), ""]
    elif meta.get("compile_error"):
        lines += [f"`--compile` failed: {meta['compile_error']}", ""]
    bd = [r for r in rows if r.get("breakdown")]
    if bd:
        lines += [
            "Where a step's time goes (torch profiler over an eager step, GPU kernel time summed per part). The",
            "graph replays the same kernels except in MLA, whose eager key span is `lengths + 1` slots and the",
            "graph's the cache's whole capacity, so at long context the two can pick different GEMM kernels:",
            "",
            "| batch | context | kernels/step | kernel sum ms | KDA ms | MLA ms | MLP+MoE ms | rest ms | graph ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in bd:
            b = r["breakdown"]
            lines.append(
                f"| {r['batch']} | {r['context']} | {b['kernels']:.0f} | {ms(b['total'])} | {ms(b['kda'])} | "
                f"{ms(b['mla'])} | {ms(b['mlp'] + b['moe'])} | {ms(b['rest'])} | {ms(r['graph'])} |"
            )
        for r in bd:
            tops = "; ".join(f"`{n}` {t * 1e3:.3f} ({c})" for n, t, c in r["breakdown"]["top"])
            lines += ["", f"Top kernels, batch {r['batch']}, context {r['context']} (ms/step, calls/step): {tops}"]
        lines.append("")
    if peer is None:
        lines.append("Peer (transformers' Kimi Linear): not run (pass --peer).")
    elif "error" in peer:
        lines.append(f"Peer (transformers' Kimi Linear): could not run: {peer['error']}")
    else:
        ours = next((r for r in rows if r["batch"] == 1 and r["context"] == peer["context"]), None)
        vs = f"; ours (graph) is {peer['step_s'] / ours['graph']:.0f}x faster" if ours else ""
        lines.append(
            f"Peer: transformers {peer['transformers']} native Kimi Linear (FLA {peer['fla']}), same config, "
            f"random bf16 weights, batch 1, real prefill of {peer['context']} tokens ({peer['prefill_s']:.2f} s, first "
            f"call, includes Triton compilation), median of 8 decode steps {ms(peer['step_s'])} ms{vs}."
            + ("" if peer.get("causal_conv1d", True) else " (`causal_conv1d` is not installed on the device, so the "
               "peer's short convolution runs its PyTorch fallback.)")
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--steps", type=int, default=64, help="timed graph replays per point (eager: a quarter)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the profiler breakdown of a step")
    ap.add_argument("--compile", action="store_true",
                    help="then torch.compile norms, short convs and MLPs and time the graph again")
    ap.add_argument("--peer", action="store_true", help="also time transformers' Kimi Linear (needs FLA)")
    ap.add_argument("--peer-context", type=int, default=4096)
    ap.add_argument("--out", default=None, help="write the Markdown section here")
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run, no graphs)")
    args = ap.parse_args(argv)

    from hla.models import KimiLinearConfig

    device, dtype = torch.device(args.device), torch.bfloat16
    config = KimiLinearConfig.preset(args.preset)
    torch.manual_seed(0)
    model = build_random_model(config, device, dtype)
    bw = copy_bandwidth(device)
    wbytes = streamed_weight_bytes(model)
    meta = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        "params": model.num_parameters(),
        "dtype": "bf16",
        "schedule": config.schedule_string(),
        "copy_bw": bw,
        "weight_bytes": wbytes,
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    try:
        import hla.ops.kda.triton  # noqa: F401

        meta["kda_backend"] = "triton" if device.type == "cuda" else "torch"
    except ImportError as e:
        meta["kda_backend"] = f"torch (no triton backend: {e})"
    print(f"{meta['card']}: copy {bw / 1e12:.2f} TB/s; streamed weights {wbytes / 1e9:.2f} GB", flush=True)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            r = bench_ours(model, batch, context, args.steps, dtype, device, not args.no_breakdown)
            r["floor_weights"] = wbytes / bw
            r["floor"] = (wbytes + cache_bytes_read(config, batch, context, dtype)) / bw
            rows.append(r)
            print(f"B={batch:3d} ctx={context:6d}: eager {r['eager'] * 1e3:8.3f} ms  graph {r['graph'] * 1e3:8.3f} ms"
                  f"  ({batch / r['graph']:8.0f} tok/s)  floor {r['floor'] * 1e3:.3f} ms"
                  f"  -> {r['graph'] / r['floor']:.2f}x floor", flush=True)
    if args.compile and device.type == "cuda":
        try:
            n = compile_small_modules(model)
            for r in rows:
                c = bench_ours(model, r["batch"], r["context"], args.steps, dtype, device, False, modes=("graph",))
                r["graph_compiled"] = c["graph"]
                print(f"B={r['batch']:3d} ctx={r['context']:6d}: graph with {n} compiled modules "
                      f"{c['graph'] * 1e3:8.3f} ms -> {c['graph'] / r['floor']:.2f}x floor", flush=True)
        except Exception as e:  # an experiment: report, do not lose the other numbers
            meta["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"compile failed: {meta['compile_error']}", flush=True)
    peer = None
    if args.peer and device.type == "cuda":
        del model
        free_memory(device)
        try:
            peer = bench_peer(config, args.peer_context, 8, dtype, device)
            print(f"peer: {peer}", flush=True)
        except Exception as e:  # the peer is optional: report why it did not run
            peer = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"peer failed: {peer['error']}", flush=True)
    text = render(meta, rows, peer)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "peer": peer}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
