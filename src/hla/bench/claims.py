"""Kimi Linear's efficiency claims, measured: a hybrid config against its all-MLA twin.

The technical report (spec section 7) claims, for the 48B model against an all-MLA model of the
same widths and MoE: a ~75% smaller KV cache, a 2.2x faster time per output token (TPOT) at 1M
context and batch 1, 6.3x when the saved memory buys a larger batch, and a 2.9x faster prefill
at 1M. This module measures the same quantities for any config on the device it runs on:

- **cache bytes vs context**: predicted (``predict_cache_bytes``) and measured (the buffers of a
  ``HybridCache`` allocated for batch 1, when it fits in memory);
- **TPOT at batch 1 vs context**: the cache is filled with *random* latents, conv windows and
  fp32 states and its lengths set to the context. Decode time does not depend on the values,
  and this skips a 1M-token prefill per point. The step runs in a CUDA graph (gen's
  ``DecodeRunner``) when the capture works, else eagerly; the output says which;
- **the largest batch the free memory holds** (predicted from the cache bytes per sequence,
  the weights and a margin, then verified by allocating and running it) and the decode
  throughput at that batch;
- **prefill time vs length** (one forward over the prompt without a cache, last-position logits
  only), the fitted scaling exponent, and longer lengths extrapolated (labelled so);
- **a per-layer-type breakdown of one decode step**: each layer's mixer and FFN timed alone (a
  CUDA graph each), the rest (embedding, norms, residuals, LM head) by difference.

Both models are built on the meta device, cast, and materialised directly on the target device
with random weights (a 48B model never touches the CPU). Every measurement lands in the JSON file
as soon as it exists, so a run cut short by a time limit still leaves its numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hla.bench.options import DEFAULT_CONTEXTS, DEFAULT_PREFILL, STAGES, add_arguments
from hla.bench.timing import copy_bandwidth as _copy_bandwidth
from hla.generation.cache import HybridCache, predict_cache_bytes
from hla.models import KimiLinearConfig, KimiLinearForCausalLM

MODELS = ("hybrid", "all_mla")
# Technical report (spec section 7), 48B hybrid vs all-MLA: speedup by context.
PAPER_TPOT = {524288: 1.8, 1048576: 2.2}
PAPER_THROUGHPUT = {262144: 4.8, 524288: 5.7, 1048576: 6.3}
PAPER_PREFILL = {524288: 2.3, 1048576: 2.9}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _scaled_2b() -> KimiLinearConfig:
    # The "1b" preset's shape (hidden 2048, 24 layers 3:1 = 18 KDA + 6 MLA, 16 KDA heads of 128,
    # 16 MLA heads, latent 512 + 64) with the release's 163840-token vocabulary and a dense
    # 8192-wide MLP: 2.28B parameters, 4.6 GB in bf16, so its all-MLA twin's 1M-token cache
    # (29 GB) still fits an 80 GB card next to it.
    return KimiLinearConfig.preset("1b").replace(intermediate_size=8192, vocab_size=163840)


BENCH_CONFIGS: dict[str, Callable[[], KimiLinearConfig]] = {"scaled-2b": _scaled_2b}
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def resolve_config(name: str) -> tuple[KimiLinearConfig, str]:
    """``name``: a ``config.json`` (or a directory holding one), a bench config (``scaled-2b``) or a preset."""
    if os.path.exists(name):
        config = KimiLinearConfig.from_json(name)
        return config, Path(name).stem if Path(name).is_file() else Path(name).name
    if name in BENCH_CONFIGS:
        return BENCH_CONFIGS[name](), name
    return KimiLinearConfig.preset(name), name


def fmt_length(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


# ---- models and memory ------------------------------------------------------------------------------

def build_model(config: KimiLinearConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight model on ``device`` in ``dtype``. On a GPU it is built on the meta device and
    materialised there directly (a 48B model never touches the CPU nor exists in fp32)."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        return KimiLinearForCausalLM(config).to_dtype(dtype).eval()
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    model.to_dtype(dtype)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives a tied head its own storage
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def weight_nbytes(config: KimiLinearConfig, dtype: torch.dtype) -> int:
    """Bytes of the parameters of ``config`` in ``dtype``, by formula: the KDA gate (``A_log``,
    ``dt_bias``), the short-conv taps and the MoE router stay fp32 whatever the model dtype
    (a test checks this against a built model, so a new fp32 tensor shows up there)."""
    el = torch.empty(0, dtype=dtype).element_size()
    total = config.parameter_counts()["total"]
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.kda_conv_size
    fp32 = config.num_kda_layers * (H + H * K + 3 * H * K * W)
    if config.num_moe_layers:
        fp32 += config.num_moe_layers * (config.num_experts * config.hidden_size + config.num_experts)
    if el >= 4:
        return total * el
    return (total - fp32) * el + fp32 * 4


def decode_weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step must read: all but the embedding table (one row per token);
    routed experts only in the fraction ``min(E, batch * k) / E`` a batch can touch."""
    cfg = model.config
    emb = model.model.embed_tokens.weight
    total = 0.0
    for name, p in model.named_parameters():
        if p is emb and not cfg.tie_word_embeddings:
            continue
        b = p.numel() * p.element_size()
        if ".experts.w" in name:
            E, k = cfg.num_experts, cfg.num_experts_per_token
            b *= min(E, batch * k) / E
        total += b
    return int(total)


def cache_bytes_read(config, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes a decode step touches in the cache: every latent once, KDA states and windows read + written."""
    p = predict_cache_bytes(config, batch, context, dtype=dtype)
    return p["mla_latent"] + 2 * p["kda_state"] + 2 * p["kda_conv"]


def decode_workspace_bytes(config, context: int) -> int:
    """Transient bytes per sequence of an absorbed-MLA decode step: a few ``[H, S]`` score buffers
    (bf16 einsum outputs, fp32 scores, masked and softmaxed copies) and the logits."""
    return 16 * config.num_attention_heads * context + 8 * config.vocab_size + 64 * config.hidden_size


def memory_margin(device: torch.device, total: int) -> int:
    """Headroom left unallocated: allocator fragmentation, cuBLAS workspaces, the CUDA-graph pool."""
    return max(1 << 30, int(0.04 * total)) if device.type == "cuda" else 0


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device (host RAM on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def predict_max_batch(config, context: int, free_bytes: int, margin: int, dtype: torch.dtype, *,
                      extra_slots: int = 64, cap: int | None = None) -> int:
    """Largest batch whose cache (``context + extra_slots`` slots) and decode workspace fit in
    ``free_bytes - margin``; 0 when not even one sequence fits."""
    per_seq = (predict_cache_bytes(config, 1, context + extra_slots, dtype=dtype)["total"]
               + decode_workspace_bytes(config, context + extra_slots))
    b = max(0, (free_bytes - margin) // per_seq)
    return int(min(b, cap) if cap else b)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, OOM_ERRORS) or "out of memory" in str(e).lower()


def _release(device: torch.device) -> None:
    """Return freed GPU memory to the driver so the next free-memory reading is true (no-op on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass
        torch.cuda.empty_cache()


class ModelPool:
    """Builds the hybrid and all-MLA models on demand; keeps both resident only when they are small
    next to the device memory (else one at a time, rebuilt from the same seed when needed again)."""

    def __init__(self, configs: dict[str, KimiLinearConfig], device, dtype, *, keep_both: bool, seed: int = 0):
        self.configs, self.device, self.dtype = configs, device, dtype
        self.keep_both, self.seed = keep_both, seed
        self.live: dict[str, torch.nn.Module] = {}
        self.builds = 0

    def get(self, name: str, *, exclusive: bool = False):
        """The model ``name``; ``exclusive`` frees the other first on a GPU (its memory must not count)."""
        if (exclusive and self.device.type == "cuda") or not self.keep_both:
            self.drop(keep=name)
        if name not in self.live:
            self.live[name] = build_model(self.configs[name], self.device, self.dtype, self.seed)
            self.builds += 1
        return self.live[name]

    def drop(self, keep: str | None = None) -> None:
        for n in [n for n in self.live if n != keep]:
            del self.live[n]
        _release(self.device)


# ---- timing -----------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` back-to-back calls (CUDA events on the GPU, host clock on the CPU)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1e3 for a, b in events]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _capture(fn: Callable[[], object], device: torch.device, warmup: int = 2):
    """Capture ``fn`` in a CUDA graph (after eager warm-up calls on a side stream); returns the graph."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_call(fn: Callable[[], object], *, steps: int, warmup: int, device: torch.device,
              use_graph: bool) -> dict:
    """Median seconds of ``fn`` (graph-replayed when ``use_graph`` and the capture works)."""
    mode, error, call = "eager", None, fn
    if use_graph and device.type == "cuda":
        try:
            graph = _capture(fn, device)
            call, mode = graph.replay, "graph"
        except RuntimeError as e:
            if _is_oom(e):
                raise
            error = f"{type(e).__name__}: {str(e)[:200]}"
            _release(device)
    for _ in range(warmup):
        call()
    _sync(device)
    times = time_steps(call, steps, device)
    return {"s": statistics.median(times), "mode": mode, "graph_error": error}


@torch.no_grad()
def fill_random_cache(cache: HybridCache, context: int) -> None:
    """Random latents, windows and states (values do not change decode time); every row at ``context``."""
    for t in cache.tensors():
        t.normal_(0.0, 0.5 if t.dtype in (torch.float32, torch.float64) else 1.0)
    cache.set_lengths(torch.full_like(cache.lengths, context))


@torch.no_grad()
def measure_decode(model, batch: int, context: int, *, steps: int, warmup: int, use_graph: bool,
                   device: torch.device, dtype: torch.dtype) -> dict:
    """Median time of one decode step ``[batch, 1]`` on a cache holding ``context`` random tokens per row.

    Raises the device's out-of-memory error when the cache or the step does not fit."""
    from hla.generation.graph import DecodeRunner

    cfg = model.config
    graph = use_graph and device.type == "cuda"
    if graph:
        warmup = max(warmup, 3)  # the runner's 2 eager steps + the capture
    cache = HybridCache.allocate(cfg, batch, context + warmup + steps + 8, device=device, dtype=dtype)
    fill_random_cache(cache, context)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    error = None
    runner = DecodeRunner(model, cache, use_graph=graph)
    try:
        for _ in range(warmup):
            runner(ids)
        _sync(device)
    except RuntimeError as e:
        if _is_oom(e) or not graph:
            raise
        error = f"{type(e).__name__}: {str(e)[:200]}"
        del runner
        _release(device)
        cache.static_key_span = None
        fill_random_cache(cache, context)
        graph = False
        runner = DecodeRunner(model, cache, use_graph=False)
        for _ in range(warmup):
            runner(ids)
    times = time_steps(lambda: runner(ids), steps, device)
    return {
        "batch": batch, "context": context, "mode": "graph" if runner.captured else "eager",
        "ms": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3, "steps": steps,
        "cache_bytes": cache.nbytes(), "graph_error": error,
    }


@torch.no_grad()
def measure_breakdown(model, context: int, *, steps: int, warmup: int, use_graph: bool, device: torch.device,
                      dtype: torch.dtype, step_ms: float | None = None) -> dict:
    """Time each layer's mixer and FFN alone on a batch-1 decode input over a ``context``-token cache.

    ``step_ms``: the full decode step at the same batch, context and mode (measured here when None);
    the rest (embedding, norms, residual adds, LM head) is the step minus the parts."""
    cfg = model.config
    cache = HybridCache.allocate(cfg, 1, context + 8, device=device, dtype=dtype)
    fill_random_cache(cache, context)
    graph = use_graph and device.type == "cuda"
    if graph:
        cache.static_key_span = cache.max_length  # what the graphed decode step attends over
    x = torch.randn(1, 1, cfg.hidden_size, device=device, dtype=dtype)
    layers, modes = [], set()
    for i, layer in enumerate(model.model.layers):
        h_mix = layer.input_layernorm(x)
        h_ffn = layer.post_attention_layernorm(x)
        ffn = layer.block_sparse_moe if layer.is_moe else layer.mlp
        mix = time_call(lambda m=layer.self_attn, h=h_mix, kv=cache: m(h, kv), steps=steps, warmup=warmup,
                        device=device, use_graph=graph)
        ff = time_call(lambda f=ffn, h=h_ffn: f(h), steps=steps, warmup=warmup, device=device, use_graph=graph)
        modes.update((mix["mode"], ff["mode"]))
        layers.append({"layer": i, "mixer": "mla" if layer.is_mla else "kda", "ffn": "moe" if layer.is_moe else "mlp",
                       "mixer_ms": mix["s"] * 1e3, "ffn_ms": ff["s"] * 1e3})
    del cache
    _release(device)
    if step_ms is None:
        step_ms = measure_decode(model, 1, context, steps=steps, warmup=warmup, use_graph=use_graph,
                                 device=device, dtype=dtype)["ms"]
    parts = {
        "kda_mixer_ms": sum(r["mixer_ms"] for r in layers if r["mixer"] == "kda"),
        "mla_attention_ms": sum(r["mixer_ms"] for r in layers if r["mixer"] == "mla"),
        "moe_ms": sum(r["ffn_ms"] for r in layers if r["ffn"] == "moe"),
        "mlp_ms": sum(r["ffn_ms"] for r in layers if r["ffn"] == "mlp"),
    }
    return {
        "context": context, "batch": 1, "mode": "+".join(sorted(modes)), "step_ms": step_ms, **parts,
        "rest_ms": step_ms - sum(parts.values()), "num_kda": cfg.num_kda_layers, "num_mla": cfg.num_mla_layers,
        "num_moe": cfg.num_moe_layers, "layers": layers,
    }


@torch.no_grad()
def measure_prefill(model, length: int, *, repeats: int, device: torch.device) -> dict:
    """Seconds of one forward over ``length`` random tokens at batch 1 (no cache, last logits only)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"length": length, "s": statistics.median(times), "runs": repeats}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device copy bandwidth in bytes/s (read + write); None on the CPU, where it means nothing here."""
    if device.type != "cuda":
        return None
    bw = _copy_bandwidth(device, nbytes)
    _release(device)
    return bw


def scaling_exponent(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(length); None with fewer than 2 points."""
    pts = [(math.log(n), math.log(t)) for n, t in points if t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den > 0 else None


# ---- the run ----------------------------------------------------------------------------------------

class _NoBar:
    def __init__(self, *args, disable: bool = False, **kwargs) -> None:
        self.disable = disable

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, msg: str, file=None) -> None:
        if not self.disable:
            print(msg, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Deadline:
    """Wall-clock budget of a run; ``None`` = unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


@dataclass
class BenchSettings:
    config: KimiLinearConfig
    config_name: str
    device: torch.device
    dtype: torch.dtype
    twin_schedule: str = "all_mla"
    contexts: Sequence[int] = DEFAULT_CONTEXTS
    throughput_contexts: Sequence[int] | None = None
    prefill_lengths: Sequence[int] = DEFAULT_PREFILL
    stages: Sequence[str] = STAGES
    steps: int = 32
    warmup: int = 4
    max_batch: int = 1024  # searching beyond this says little more about the claims, and costs minutes
    memory_bytes: int | None = None
    time_budget: float | None = None
    use_graph: bool = True
    json_path: str | None = None
    progress: bool = True
    seed: int = 0
    command: str = ""
    notes: list = field(default_factory=list)


def _save(results: dict, path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _summary(results: dict) -> dict:
    """Speedups at the longest context where both models were measured, next to the paper's."""
    out: dict = {}
    cache = results["cache"]
    if cache:
        out["cache_kv_reduction_min_pct"] = min(r["kv_reduction_pct"] for r in cache)
        out["cache_total_reduction_pct"] = {str(r["context"]): r["total_reduction_pct"] for r in cache}
        checked = [r[m] for r in cache for m in MODELS if r[m]["measured"] is not None]
        out["cache_measured_equals_predicted"] = (all(c["measured"] == c["predicted"]["total"] for c in checked)
                                                  if checked else None)
        out["cache_allocations_checked"] = len(checked)

    def paired(rows: list, key: str) -> dict:
        by = {}
        for r in rows:
            if r.get(key) is not None:
                by.setdefault(r["context"], {})[r["model"]] = r
        return {c: v for c, v in by.items() if len(v) == 2}

    tp = paired(results["tpot"], "ms")
    if tp:
        c = max(tp)
        out["tpot_speedup"] = {"context": c, "hybrid_ms": tp[c]["hybrid"]["ms"], "all_mla_ms": tp[c]["all_mla"]["ms"],
                               "ours": tp[c]["all_mla"]["ms"] / tp[c]["hybrid"]["ms"], "paper": PAPER_TPOT.get(c),
                               "paper_context": 1048576, "paper_at_1m": PAPER_TPOT[1048576]}
    th = paired(results["throughput"], "tokens_per_s")
    if th:
        c = max(th)
        h, m = th[c]["hybrid"], th[c]["all_mla"]
        out["throughput_speedup"] = {
            "context": c, "hybrid_batch": h["batch"], "all_mla_batch": m["batch"],
            "hybrid_tokens_per_s": h["tokens_per_s"], "all_mla_tokens_per_s": m["tokens_per_s"],
            "ours": h["tokens_per_s"] / m["tokens_per_s"], "paper": PAPER_THROUGHPUT.get(c),
            "paper_at_1m": PAPER_THROUGHPUT[1048576]}
        # A larger batch is not always faster per token (the all-MLA step at 1M, the 48B MoE at
        # batch > 1): compare also each model's best measured rate, batch 1 included.
        one = {(r["model"], r["context"]): 1e3 / r["ms"] for r in results["tpot"] if r.get("ms")}
        best = {n: max(th[c][n]["tokens_per_s"], one.get((n, c), 0.0)) for n in MODELS}
        out["throughput_speedup_best"] = {
            "context": c, "hybrid_tokens_per_s": best["hybrid"], "all_mla_tokens_per_s": best["all_mla"],
            "ours": best["hybrid"] / best["all_mla"], "paper": PAPER_THROUGHPUT.get(c)}
    pf = results["prefill"]
    lens = sorted(set(r["length"] for r in pf["hybrid"]) & set(r["length"] for r in pf["all_mla"]))
    if lens:
        n = lens[-1]
        h = next(r["s"] for r in pf["hybrid"] if r["length"] == n)
        m = next(r["s"] for r in pf["all_mla"] if r["length"] == n)
        out["prefill_speedup"] = {"length": n, "ours": m / h, "paper": PAPER_PREFILL.get(n)}
        ex = {e["length"]: e for e in pf.get("extrapolated", [])}
        if 1048576 in ex and ex[1048576].get("hybrid_s") and ex[1048576].get("all_mla_s"):
            out["prefill_speedup_1m_extrapolated"] = {
                "ours": ex[1048576]["all_mla_s"] / ex[1048576]["hybrid_s"], "paper": PAPER_PREFILL[1048576]}
    return out


def _extrapolate(rows: list, targets: Sequence[int]) -> dict:
    """Times at ``targets`` beyond the measured lengths, from the last point and the local exponent
    of the last two (the quadratic attention term grows in share with length, so this errs low)."""
    rows = sorted(rows, key=lambda r: r["length"])
    if len(rows) < 2:
        return {}
    (n0, t0), (n1, t1) = (rows[-2]["length"], rows[-2]["s"]), (rows[-1]["length"], rows[-1]["s"])
    alpha = math.log(t1 / t0) / math.log(n1 / n0) if t0 > 0 and t1 > 0 else None
    if alpha is None or not 0.5 <= alpha <= 2.5:
        return {}  # noise-dominated (tiny lengths): a slope outside this range says nothing about longer ones
    return {n: t1 * (n / n1) ** alpha for n in targets if n > n1}


def run_claims(s: BenchSettings) -> dict:
    """Run the selected stages; returns (and keeps saving to ``s.json_path``) the results dict."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; the per-point log lines carry the same news
        tqdm = _NoBar

    device, dtype = s.device, s.dtype
    configs = {"hybrid": s.config, "all_mla": s.config.with_schedule(s.twin_schedule)}
    deadline = Deadline(s.time_budget)
    tp_contexts = list(s.throughput_contexts) if s.throughput_contexts is not None else list(s.contexts)
    free0, total = device_memory(device)
    if s.memory_bytes is not None:
        free0 = min(free0, s.memory_bytes) if device.type == "cuda" else s.memory_bytes
    margin = memory_margin(device, total)
    wbytes = {m: weight_nbytes(c, dtype) for m, c in configs.items()}
    counts = {m: c.parameter_counts() for m, c in configs.items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {
        "meta": {
            "card": card, "device": str(device), "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"), "torch": torch.__version__, "python": platform.python_version(),
            "command": s.command, "config": s.config_name, "dtype": str(dtype).replace("torch.", ""),
            "schedules": {m: c.schedule_string() for m, c in configs.items()},
            "num_mla_layers": {m: c.num_mla_layers for m, c in configs.items()},
            "params": {m: counts[m]["total"] for m in MODELS},
            "active_params": {m: counts[m]["active"] for m in MODELS},
            "weight_bytes": wbytes, "memory_total": total, "memory_free_at_start": free0, "memory_margin": margin,
            "time_budget_s": s.time_budget, "steps": s.steps, "warmup": s.warmup, "max_batch_cap": s.max_batch,
            "cache_fill": "random latents, conv windows and fp32 states; lengths set to the context (no prefill)",
            "prefill_method": "one forward over random tokens at batch 1 without a cache, last-position logits only",
            "copy_bandwidth": None, "notes": list(s.notes), "skipped": [],
        },
        "cache": [], "tpot": [], "breakdown": {}, "throughput": [], "max_batch_predicted": [],
        "prefill": {"hybrid": [], "all_mla": [], "exponent": {}, "extrapolated": []}, "summary": {},
    }
    meta = results["meta"]
    stages = [st for st in STAGES if st in set(s.stages)]
    planned = (("cache" in stages) * len(s.contexts) + ("tpot" in stages) * 2 * len(s.contexts)
               + ("breakdown" in stages) * 2 + ("throughput" in stages) * 2 * len(tp_contexts)
               + ("prefill" in stages) * 2 * len(s.prefill_lengths))
    bar = tqdm(total=planned, desc="hla bench", unit="pt", file=sys.stderr, disable=not s.progress,
               dynamic_ncols=True, mininterval=1.0)

    def log(msg: str) -> None:
        if s.progress:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def skip(what: str, why: str) -> None:
        meta["skipped"].append(f"{what}: {why}")
        log(f"skip {what}: {why}")

    def save() -> None:
        results["summary"] = _summary(results)
        _save(results, s.json_path)

    def free_after_weights(m: str) -> int:
        """Free bytes now (model ``m`` and any other resident model loaded), capped by --memory-gb."""
        free, _ = device_memory(device)
        if s.memory_bytes is None:
            return free
        others = sum(wbytes[n] for n in pool.live if n != m)
        planned = s.memory_bytes - wbytes[m] - others
        return min(free, planned) if device.type == "cuda" else planned

    keep_both = device.type != "cuda" or sum(wbytes.values()) < 0.25 * total
    pool = ModelPool(configs, device, dtype, keep_both=keep_both, seed=s.seed)
    meta["copy_bandwidth"] = copy_bandwidth(device)
    bw = meta["copy_bandwidth"]

    # Predicted max batch at every context (pure arithmetic; verified below where measured).
    for c in sorted(set(s.contexts) | set(tp_contexts)):
        row = {"context": c}
        for m in MODELS:
            row[m] = predict_max_batch(configs[m], c, free0 - wbytes[m], margin, dtype, cap=s.max_batch)
        results["max_batch_predicted"].append(row)
    save()

    # 1. Cache bytes: predicted for every context, measured (batch 1) where it fits.
    if "cache" in stages:
        for c in s.contexts:
            row = {"context": c}
            for m in MODELS:
                pred = predict_cache_bytes(configs[m], 1, c, dtype=dtype)
                measured, note = None, "not allocated (does not fit)"
                if pred["total"] < free0 - margin and deadline.left() > 5:
                    try:
                        cache = HybridCache.allocate(configs[m], 1, c, device=device, dtype=dtype)
                        measured, note = cache.nbytes(), "allocated"
                        del cache
                    except OOM_ERRORS:
                        note = "not allocated (out of memory)"
                    _release(device)
                row[m] = {"predicted": pred, "measured": measured, "note": note}
            h, a = row["hybrid"]["predicted"], row["all_mla"]["predicted"]
            row["kv_reduction_pct"] = 100.0 * (1 - h["mla_latent"] / a["mla_latent"]) if a["mla_latent"] else None
            row["total_reduction_pct"] = 100.0 * (1 - h["total"] / a["total"])
            results["cache"].append(row)
            bar.update(1)
        save()

    # 2. TPOT at batch 1 vs context (+ the per-layer breakdown at the longest context that ran).
    for m in MODELS:
        if "tpot" not in stages and "breakdown" not in stages:
            break
        for c in s.contexts:
            if "tpot" not in stages:
                break
            bar.set_postfix_str(f"tpot {m} {fmt_length(c)}")
            model = None  # drop our reference first, so a switch can free it
            model = pool.get(m)
            need = (predict_cache_bytes(configs[m], 1, c + 64, dtype=dtype)["total"]
                    + decode_workspace_bytes(configs[m], c + 64))
            if need > free_after_weights(m) - margin:
                skip(f"tpot {m} {fmt_length(c)}", "batch-1 cache does not fit")
            elif deadline.left() < 20:
                skip(f"tpot {m} {fmt_length(c)}", "time budget")
            else:
                try:
                    r = measure_decode(model, 1, c, steps=s.steps, warmup=s.warmup, use_graph=s.use_graph,
                                       device=device, dtype=dtype)
                    r["model"] = m
                    if bw:
                        streamed = decode_weight_bytes(model, 1) + cache_bytes_read(configs[m], 1, c, dtype)
                        r["floor_ms"] = streamed / bw * 1e3
                    results["tpot"].append(r)
                    log(f"tpot {m:8s} ctx {fmt_length(c):>5s}: {r['ms']:9.3f} ms ({r['mode']})")
                except OOM_ERRORS:
                    skip(f"tpot {m} {fmt_length(c)}", "out of memory")
                _release(device)
            bar.update(1)
            save()
        if "breakdown" in stages:
            # The same context for both models: the longest where both hold a batch-1 cache.
            both = [r["context"] for r in results["max_batch_predicted"]
                    if r["context"] in set(s.contexts) and r["hybrid"] >= 1 and r["all_mla"] >= 1]
            c = max(both) if both else min(s.contexts)
            step = next((r for r in results["tpot"] if r["model"] == m and r["context"] == c), None)
            if deadline.left() < 30:
                skip(f"breakdown {m}", "time budget")
            else:
                bar.set_postfix_str(f"breakdown {m} {fmt_length(c)}")
                try:
                    model = None  # drop our reference first, so a switch can free it
                    model = pool.get(m)
                    results["breakdown"][m] = measure_breakdown(
                        model, c, steps=s.steps, warmup=s.warmup, use_graph=s.use_graph, device=device, dtype=dtype,
                        step_ms=step["ms"] if step else None)
                except OOM_ERRORS:
                    skip(f"breakdown {m}", "out of memory")
                _release(device)
            bar.update(1)
            save()

    # 3. Throughput at the largest batch that fits, longest context first (the claim is about 1M).
    if "throughput" in stages:
        for c in sorted(tp_contexts, reverse=True):
            for m in MODELS:
                bar.set_postfix_str(f"throughput {m} {fmt_length(c)}")
                if deadline.left() < 30:
                    skip(f"throughput {m} {fmt_length(c)}", "time budget")
                    bar.update(1)
                    continue
                model = None  # drop our reference first, so a switch can free it
                model = pool.get(m, exclusive=True)
                free = free_after_weights(m)
                b_pred = predict_max_batch(configs[m], c, free, margin, dtype, cap=s.max_batch)
                b, retries, row = b_pred, 0, None
                while b >= 1 and retries <= 6 and deadline.left() > 20:
                    try:
                        row = measure_decode(model, b, c, steps=max(2, s.steps // 2), warmup=s.warmup,
                                             use_graph=s.use_graph, device=device, dtype=dtype)
                        break
                    except OOM_ERRORS:
                        _release(device)
                        retries += 1
                        b = b - 1 if b <= 10 else int(b * 0.9)
                _release(device)
                if row is None:
                    skip(f"throughput {m} {fmt_length(c)}", "no batch fits" if b_pred < 1 or b < 1 else "time budget")
                else:
                    row.update(model=m, batch_predicted=b_pred, oom_retries=retries, free_bytes=free,
                               tokens_per_s=row["batch"] / (row["ms"] / 1e3), ms_per_token=row["ms"] / row["batch"])
                    if bw:
                        row["floor_ms"] = (decode_weight_bytes(model, row["batch"])
                                           + cache_bytes_read(configs[m], row["batch"], c, dtype)) / bw * 1e3
                    results["throughput"].append(row)
                    log(f"throughput {m:8s} ctx {fmt_length(c):>5s}: batch {row['batch']} "
                        f"{row['tokens_per_s']:10.1f} tok/s ({row['mode']})")
                bar.update(1)
                save()
        pool.drop()

    # 4. Prefill vs length (per length both models, so a cut keeps pairs).
    if "prefill" in stages:
        pf = results["prefill"]
        warmed: set = set()
        stopped: set = set()
        for n in sorted(s.prefill_lengths):
            for m in MODELS:
                bar.set_postfix_str(f"prefill {m} {fmt_length(n)}")
                prev = pf[m][-1] if pf[m] else None
                # Attention is quadratic: assume the worst when guessing whether the next point fits.
                est = prev["s"] * (n / prev["length"]) ** 2 if prev else 1.0
                if m in stopped:
                    bar.update(1)
                    continue
                if deadline.left() < 3 * est + 10:
                    skip(f"prefill {m} {fmt_length(n)}", f"time budget (estimated {est:.1f} s)")
                    stopped.add(m)
                    bar.update(1)
                    continue
                model = None  # drop our reference first, so a switch can free it
                model = pool.get(m)
                try:
                    if m not in warmed:  # Triton compiles, cuBLAS/SDPA heuristics, lazy CPU init
                        measure_prefill(model, min(s.prefill_lengths), repeats=1, device=device)
                        warmed.add(m)
                    repeats = 3 if est < 2 else (2 if est < 8 and deadline.left() > 6 * est + 30 else 1)
                    r = measure_prefill(model, n, repeats=repeats, device=device)
                    pf[m].append(r)
                    log(f"prefill {m:8s} len {fmt_length(n):>5s}: {r['s']:8.3f} s")
                except OOM_ERRORS:
                    skip(f"prefill {m} {fmt_length(n)}", "out of memory")
                    stopped.add(m)
                _release(device)
                bar.update(1)
                save()
        for m in MODELS:
            pts = [(r["length"], r["s"]) for r in pf[m]]
            long_pts = [p for p in pts if p[0] >= 16384]
            pf["exponent"][m] = {
                "all": scaling_exponent(pts), "from_16k": scaling_exponent(long_pts) if len(long_pts) >= 2 else None,
                "last_two": scaling_exponent(pts[-2:]) if len(pts) >= 2 else None,
            }
        targets = sorted(set(list(s.contexts) + [524288, 1048576]))
        ex_h, ex_m = _extrapolate(pf["hybrid"], targets), _extrapolate(pf["all_mla"], targets)
        pf["extrapolated"] = [{"length": n, "hybrid_s": ex_h.get(n), "all_mla_s": ex_m.get(n), "extrapolated": True}
                              for n in sorted(set(ex_h) | set(ex_m))]
    pool.drop()
    bar.close()
    meta["elapsed_s"] = None if deadline.end is None else s.time_budget - deadline.left()
    save()
    return results


# ---- command line -----------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    from hla.bench.report import render_markdown, save_plots

    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
        results["summary"] = _summary(results)  # this version's comparisons, from the raw points
        stem = args.name or Path(args.replot).stem
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config, cname = resolve_config(args.config)
        stages = [x.strip() for x in args.stages.split(",") if x.strip()]
        bad = [x for x in stages if x not in STAGES]
        if bad:
            raise ValueError(f"--stages: unknown {bad}; expected a subset of {list(STAGES)}")
        stem = args.name or "claims"
        os.makedirs(args.out_dir, exist_ok=True)
        settings = BenchSettings(
            config=config, config_name=cname, device=device, dtype=dtype, twin_schedule=args.twin,
            contexts=args.contexts, throughput_contexts=args.throughput_contexts,
            prefill_lengths=args.prefill_lengths, stages=stages, steps=args.steps, warmup=args.warmup,
            max_batch=args.max_batch or (1024 if device.type == "cuda" else 4),
            memory_bytes=None if args.memory_gb is None else int(args.memory_gb * 2**30),
            time_budget=args.time_budget, use_graph=not args.no_graph,
            json_path=os.path.join(args.out_dir, f"{stem}.json"), progress=not args.no_progress, seed=args.seed,
            command="hla bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        )
        results = run_claims(settings)
    text = render_markdown(results)
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(text)
    if not args.no_plots:
        save_plots(results, out_dir, stem)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hla bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_bench(p.parse_args(argv))
