"""``hla bench``: the paper's efficiency claims, measured for a config and its all-MLA twin (issue 6).

For each model (the config, and the same widths with every layer MLA):

- cache bytes vs context: predicted for every context, measured (allocated) where it fits;
- time per output token (TPOT) at batch 1 vs context, decode step in a CUDA graph;
- the largest batch whose cache fits the card's free memory at each context, and its throughput;
- prefill time vs length (batch 1, chunked through the cache), with the fitted scaling exponent;
- a breakdown of one eager decode step (KDA, MLA, MoE, MLP, rest) at the longest context.

Decode points use a cache filled with **random** latents and states (lengths set to the context):
decode time does not depend on the values. The output says so. Paper numbers (technical report,
arXiv 2510.26692; spec section 7): cache -75% ("74%" for 7 of 27 layers), TPOT 2.2-2.3x at 1M,
6.3x throughput with the memory saved spent on batch (1.84 vs 11.48 ms), prefill 2.9x at 1M.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from hla.generation.bench import (
    build_random_model,
    decode_breakdown,
    fill_random,
    free_memory,
    largest_batch,
    time_decode,
    time_prefill,
)

PAPER = {"cache_reduction": 0.74, "tpot_speedup_1m": 2.2, "throughput_speedup_1m": 6.3, "prefill_speedup_1m": 2.9}
DEFAULT_CONTEXTS = [4096, 32768, 131072, 524288, 1048576]
DEFAULT_PREFILL = [4096, 16384, 65536, 131072]


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _decode_point(model, batch: int, context: int, steps: int, use_graph: bool | None) -> tuple[float, bool]:
    """(seconds per step, graph used) for ``batch`` rows at ``context`` (random cache)."""
    from hla.generation.cache import HybridCache
    from hla.generation.graph import DecodeRunner

    device = model.device
    cache = HybridCache.allocate(model.config, batch, context + steps + 8, device=device, dtype=model.dtype)
    try:
        fill_random(cache, context)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        runner = DecodeRunner(model, cache, use_graph=use_graph)
        t = time_decode(runner, ids, steps, warmup=3)
        return t, runner.captured
    finally:
        del cache
        free_memory(device)


def _graph_ok(config, batch: int) -> bool:
    # MoE decode is sync-free (graph-capturable) only up to PADDED_MAX_TOKENS tokens per step.
    from hla.layers.moe import PADDED_MAX_TOKENS

    return config.num_moe_layers == 0 or batch <= PADDED_MAX_TOKENS


def measure_model(config, *, contexts, prefill_lengths, device, dtype, steps, progress=None,
                  breakdown: bool = True, max_batch_cap: int = 4096) -> dict:
    """All measurements of one model; see the module docstring."""
    from hla.generation.cache import HybridCache, predict_cache_bytes

    def tick(what: str) -> None:
        if progress is not None:
            progress.set_postfix_str(what)
            progress.update(1)

    torch.manual_seed(0)
    model = build_random_model(config, device, dtype)
    on_gpu = torch.device(device).type == "cuda"
    out = {"params": model.num_parameters(), "schedule": config.schedule_string(), "points": []}
    for ctx in contexts:
        p = {"context": ctx, "cache_pred": predict_cache_bytes(config, 1, ctx, dtype=dtype)["total"]}
        try:
            c = HybridCache.allocate(config, 1, ctx, device=device, dtype=dtype)
            p["cache_measured"] = c.nbytes()
            del c
        except RuntimeError as e:
            if not _oom(e):
                raise
            p["cache_measured"] = None
        free_memory(device)
        try:
            p["tpot"], p["tpot_graph"] = _decode_point(model, 1, ctx, steps, None)
        except RuntimeError as e:
            if not _oom(e):
                raise
            p["tpot"], p["tpot_graph"] = None, False
        tick(f"{config.schedule_string()[:8]}.. ctx {ctx} batch 1")
        free = torch.cuda.mem_get_info(device)[0] if on_gpu else 2 << 30
        b = largest_batch(config, ctx + steps + 8, free, dtype, cap=max_batch_cap)
        p["max_batch"] = b
        p["max_batch_tpot"] = None
        while b >= 1:
            try:
                p["max_batch_tpot"], p["max_batch_graph"] = _decode_point(
                    model, b, ctx, steps, None if _graph_ok(config, b) else False
                )
                break
            except RuntimeError as e:  # the activations did not fit the reserve: back off
                if not _oom(e):
                    raise
                free_memory(device)
                b = int(b * 0.8)
                p["max_batch"] = b
        p["throughput"] = b / p["max_batch_tpot"] if p["max_batch_tpot"] else None
        tick(f"ctx {ctx} batch {b}")
        out["points"].append(p)
    out["prefill"] = []
    if prefill_lengths:
        time_prefill(model, min(prefill_lengths))  # compiles and autotunes the kernels, untimed
    for length in prefill_lengths:
        try:
            t = time_prefill(model, length)
        except RuntimeError as e:
            if not _oom(e):
                raise
            t = None
        free_memory(device)
        out["prefill"].append({"length": length, "seconds": t})
        tick(f"prefill {length}")
    done = [(q["length"], q["seconds"]) for q in out["prefill"] if q["seconds"]]
    if len(done) >= 2:
        (l0, t0), (l1, t1) = done[-2], done[-1]
        out["prefill_exponent"] = math.log(t1 / t0) / math.log(l1 / l0)
    if breakdown and on_gpu:
        ctx = max(q["context"] for q in out["points"] if q["tpot"])
        cache = HybridCache.allocate(config, 1, ctx + 16, device=device, dtype=dtype)
        fill_random(cache, ctx)
        ids = torch.randint(0, config.vocab_size, (1, 1), device=device)
        out["breakdown"] = {"context": ctx, **decode_breakdown(model, cache, ids)}
        del cache
    del model
    free_memory(device)
    return out


def run_claims(config, *, contexts=DEFAULT_CONTEXTS, prefill_lengths=DEFAULT_PREFILL, device="cuda",
               dtype=torch.bfloat16, steps: int = 32, progress: bool = True, command: str = "") -> dict:
    """Measure ``config`` and its all-MLA twin; returns a JSON-able dict."""
    from tqdm import tqdm

    device = torch.device(device)
    twin = config.with_schedule("all_mla")
    total = 2 * (2 * len(contexts) + len(prefill_lengths))
    bar = tqdm(total=total, desc="hla bench", disable=not progress, file=sys.stderr)
    kw = dict(contexts=contexts, prefill_lengths=prefill_lengths, device=device, dtype=dtype, steps=steps,
              progress=bar, max_batch_cap=4096 if device.type == "cuda" else 4)
    res = {
        "meta": {
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "command": command,
            "note": "decode points use a cache filled with random latents/states (lengths = context)",
        },
        "hybrid": measure_model(config, **kw),
        "all_mla": measure_model(twin, **kw),
    }
    bar.close()
    return res


def _ratio(a, b):
    return b / a if a and b else None


def render(res: dict) -> str:
    """Markdown: tables of cache, TPOT, throughput and prefill, both models, with speedups."""
    h, m, meta = res["hybrid"], res["all_mla"], res["meta"]
    f = lambda x, k=1.0, d=2: "-" if x is None else f"{x * k:.{d}f}"
    lines = [
        "## Efficiency claims: hybrid vs all-MLA (hla bench)", "",
        f"Card: {meta['card']}; date {meta['date']}; torch {meta['torch']}; {meta['dtype']}; "
        f"hybrid {h['params'] / 1e9:.2f} B parameters ({h['schedule'].count('M')} of {len(h['schedule'])} layers MLA), "
        f"twin {m['params'] / 1e9:.2f} B (all MLA). Command: `{meta['command']}`", "",
        f"Note: {meta['note']}; decode time does not depend on those values.", "",
        "| context | cache GB hybrid (measured) | cache GB all-MLA (measured) | reduction | TPOT ms hybrid | "
        "TPOT ms all-MLA | TPOT speedup | max batch hybrid / all-MLA | tok/s hybrid | tok/s all-MLA | "
        "throughput speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ph, pm in zip(h["points"], m["points"], strict=True):
        red = 1 - ph["cache_pred"] / pm["cache_pred"]
        lines.append(
            f"| {ph['context']} | {f(ph['cache_pred'], 1e-9)} ({f(ph['cache_measured'], 1e-9)}) | "
            f"{f(pm['cache_pred'], 1e-9)} ({f(pm['cache_measured'], 1e-9)}) | {red * 100:.1f}% | "
            f"{f(ph['tpot'], 1e3, 3)} | {f(pm['tpot'], 1e3, 3)} | {f(_ratio(ph['tpot'], pm['tpot']))}x | "
            f"{ph['max_batch']} / {pm['max_batch']} | {f(ph['throughput'], d=0)} | {f(pm['throughput'], d=0)} | "
            f"{f(_ratio(pm['throughput'], ph['throughput']))}x |"
        )
    lines += ["", "| prefill length | hybrid s | all-MLA s | speedup |", "| --- | --- | --- | --- |"]
    for ph, pm in zip(h["prefill"], m["prefill"], strict=True):
        lines.append(f"| {ph['length']} | {f(ph['seconds'], d=3)} | {f(pm['seconds'], d=3)} | "
                     f"{f(_ratio(ph['seconds'], pm['seconds']))}x |")
    for name, r in (("hybrid", h), ("all-MLA", m)):
        if "prefill_exponent" in r:
            e = r["prefill_exponent"]
            lines.append(f"\n{name}: prefill time grows as length^{e:.2f} over the last two lengths.")
    lines.append("")
    for name, r in (("hybrid", h), ("all-MLA", m)):
        b = r.get("breakdown")
        if b:
            lines.append(
                f"Decode step, {name}, batch 1, context {b['context']}: GPU kernel time {b['total'] * 1e3:.3f} ms "
                f"in {b['kernels']:.0f} kernels = KDA {b['kda'] * 1e3:.3f} + MLA {b['mla'] * 1e3:.3f} + "
                f"MoE {b['moe'] * 1e3:.3f} + MLP {b['mlp'] * 1e3:.3f} + rest {b['rest'] * 1e3:.3f} ms (profiler)."
            )
    lines.append(
        f"\nPaper (48B, GPU not stated): cache -{PAPER['cache_reduction']:.0%}, TPOT {PAPER['tpot_speedup_1m']}x "
        f"at 1M, throughput {PAPER['throughput_speedup_1m']}x at 1M, prefill {PAPER['prefill_speedup_1m']}x at 1M."
    )
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: Path) -> list[Path]:
    """Three PNGs (TPOT, throughput, cache bytes vs context), both models on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    specs = [("tpot_vs_context.png", "tpot", 1e3, "time per output token, batch 1 (ms)"),
             ("throughput_vs_context.png", "throughput", 1.0, "decode tokens/s at the largest batch that fits"),
             ("cache_vs_context.png", "cache_pred", 1e-9, "cache bytes per sequence (GB)")]
    for fname, key, scale, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label in (("hybrid", "Kimi Linear (3:1 KDA:MLA)"), ("all_mla", "all-MLA twin")):
            pts = [(p["context"], p[key] * scale) for p in res[name]["points"] if p.get(key)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{res['meta']['card']}, random weights, {res['meta']['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="1b", help="preset name or config.json path (default 1b)")
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=DEFAULT_PREFILL)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (smoke run)")
    p.add_argument("--out-dir", default="benchmarks/results/claims", help="JSON, Markdown and PNGs go here")


def run_bench(args: argparse.Namespace) -> int:
    from hla.models import KimiLinearConfig

    name = args.config
    config = KimiLinearConfig.from_json(name) if Path(name).exists() else KimiLinearConfig.preset(name)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    command = "hla bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "hla bench"
    res = run_claims(config, contexts=args.contexts, prefill_lengths=args.prefill_lengths, device=device,
                     dtype=dtype, steps=args.steps, command=command)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(res, indent=2))
    text = render(res)
    (out / "claims.md").write_text(text)
    plot(res, out)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run_bench(ap.parse_args(argv))
