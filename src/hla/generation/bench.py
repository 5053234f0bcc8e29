"""Measuring decode and prefill: helpers for ``benchmarks/decode.py`` and ``hla bench`` (issue 6).

Decode measurements fill the cache with **random** latents, conv windows and fp32 states and set
its lengths to the context: a decode step's time does not depend on those values, and this skips
a prefill of up to 1M tokens per point. Everything that reports a number says so.
"""

from __future__ import annotations

import gc
import time

import torch

from hla.bench.timing import copy_bandwidth  # noqa: F401  (re-exported for benchmarks/decode.py)


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def build_random_model(config, device, dtype: torch.dtype):
    """``KimiLinearForCausalLM(config)`` with random weights, built directly in ``dtype`` on ``device``.

    Building in ``dtype`` (not fp32 then cast) matters for the 48B model: 98 GB in bf16, 196 GB in fp32.
    """
    from hla.models import KimiLinearForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
    try:
        with torch.device(device):
            model = KimiLinearForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to_dtype(dtype).eval()


def streamed_weight_bytes(model: torch.nn.Module, *, active_only: bool = True) -> int:
    """Bytes of weights one decode step of one token reads.

    The embedding table is excluded (one row per token). With ``active_only``, a MoE layer counts
    only ``num_experts_per_token`` routed experts (what batch-1 decode touches).
    """
    config = model.config
    emb = model.model.embed_tokens.weight
    total = 0
    for name, p in model.named_parameters():
        if p is emb:
            continue
        nbytes = p.numel() * p.element_size()
        if active_only and ".experts." in name and config.num_experts:
            nbytes = nbytes * config.num_experts_per_token // config.num_experts
        total += nbytes
    return total


@torch.no_grad()
def fill_random(cache, context: int) -> None:
    """Random values in every cache buffer and ``lengths = context`` for every row."""
    for t in cache.tensors():
        t.normal_(0.0, 0.5 if t.dtype == torch.float32 else 1.0)
    cache.set_lengths(torch.full_like(cache.lengths, context))


@torch.no_grad()
def time_decode(runner, ids: torch.Tensor, steps: int, warmup: int = 4) -> float:
    """Seconds per decode step: wall time of ``steps`` back-to-back calls, synchronised at both ends."""
    for _ in range(warmup):
        runner(ids)
    sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner(ids)
    sync(ids.device)
    return (time.perf_counter() - t0) / steps


def _device_time_us(ev) -> float:
    # torch renamed cuda_* to device_* (2.4); the GPU machine and the CPU env differ in version.
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(ev, name):
            return float(getattr(ev, name))
    return 0.0


def _self_device_time_us(ev) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(ev, name):
            return float(getattr(ev, name))
    return 0.0


@torch.no_grad()
def decode_breakdown(model, cache, ids: torch.Tensor, steps: int = 3, top: int = 8) -> dict:
    """GPU kernel time of one decode step by part, from the profiler: KDA mixers, MLA mixers, MoE,
    dense MLP, the rest (norms, embedding, LM head, sampling-free glue), plus the kernel count.

    Kernel times are summed (not wall time), so the host's launch gaps of an eager step do not
    count: the total is what a perfect CUDA graph of the same kernels would still take, and a
    graph replay slower than it pays per-kernel overhead (about 2-4 us each on Hopper).
    Returns seconds per step: ``{kda, mla, moe, mlp, rest, total, kernels, top: [(name, s), ...]}``.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from hla.generation.graph import DecodeRunner

    if ids.device.type != "cuda":
        raise ValueError("decode_breakdown needs a CUDA model")
    stack: list = []
    handles = []
    for layer in model.model.layers:
        mixer = "mla" if layer.is_mla else "kda"
        ffn = ("moe", layer.block_sparse_moe) if layer.is_moe else ("mlp", layer.mlp)
        for key, mod in ((mixer, layer.self_attn), ffn):
            def pre(_m, _a, key=key):
                rf = record_function(f"hla::{key}")
                rf.__enter__()
                stack.append(rf)

            def post(_m, _a, _o):
                stack.pop().__exit__(None, None, None)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    runner = DecodeRunner(model, cache, use_graph=False)
    try:
        runner(ids)  # warm-up outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner(ids)
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    from torch.autograd import DeviceType

    events = prof.events()
    out = {k: 0.0 for k in ("kda", "mla", "moe", "mlp")}
    # The profiler reports each record_function twice: as a CPU range, whose device time is the
    # sum of the kernels launched inside it (wanted), and as a GPU-side annotation spanning first
    # to last kernel, gaps included (not wanted). Kernels likewise appear as device events and
    # inside their launching CPU op: count device events that are not annotations.
    for ev in events:
        if ev.name.startswith("hla::") and ev.device_type == DeviceType.CPU:
            out[ev.name[5:]] += _device_time_us(ev) * 1e-6 / steps
    kernels = [ev for ev in events if ev.device_type != DeviceType.CPU and not ev.name.startswith("hla::")]
    out["total"] = sum(_self_device_time_us(ev) for ev in kernels) * 1e-6 / steps
    out["kernels"] = len(kernels) / steps
    out["rest"] = max(out["total"] - sum(out[k] for k in ("kda", "mla", "moe", "mlp")), 0.0)
    avg = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU and not e.key.startswith("hla::")]
    avg.sort(key=_self_device_time_us, reverse=True)
    out["top"] = [(e.key[:80], _self_device_time_us(e) * 1e-6 / steps, e.count // steps) for e in avg[:top]]
    return out


@torch.no_grad()
def time_prefill(model, length: int, *, chunk: int = 8192, dtype=None) -> float:
    """Seconds to prefill ``length`` random tokens (batch 1) into a fresh cache, ``chunk`` tokens per call."""
    from hla.generation.cache import HybridCache

    device = model.device
    cache = HybridCache.allocate(model.config, 1, length, device=device, dtype=dtype or model.dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, length, chunk):
        model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1)
    sync(device)
    dt = time.perf_counter() - t0
    del cache, ids
    return dt


def largest_batch(config, context: int, free_bytes: int, dtype: torch.dtype, *, reserve: float = 0.1,
                  per_row_extra: int = 0, cap: int = 4096) -> int:
    """Rows whose cache (predicted) fits ``free_bytes`` minus a ``reserve`` fraction for activations."""
    from hla.generation.cache import predict_cache_bytes

    per_row = predict_cache_bytes(config, 1, context, dtype=dtype)["total"] + per_row_extra
    return max(0, min(cap, int(free_bytes * (1 - reserve)) // per_row))


def compile_small_modules(model: torch.nn.Module) -> int:
    """``torch.compile`` the cache-free elementwise-heavy modules (RMSNorm, short convolution,
    SwiGLU MLP) in place; returns how many were wrapped.

    An experiment, not a default: a batch-1 decode step is hundreds of tiny kernels, and this
    measures how much fusing the norms' and convolutions' elementwise chains buys inside the
    CUDA graph. The cache-touching mixers stay eager (their host-side bookkeeping would make
    dynamo recompile every step).
    """
    from hla.layers.mlp import SwiGLUMLP
    from hla.layers.norm import RMSNorm
    from hla.layers.short_conv import ShortConvolution

    n = 0
    for m in model.modules():
        if isinstance(m, (RMSNorm, ShortConvolution, SwiGLUMLP)):
            m.compile(dynamic=False)
            n += 1
    return n
