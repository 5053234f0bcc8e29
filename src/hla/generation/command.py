"""``hla generate``: stream a completion to the terminal, then report tokens/s and cache bytes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (config.json + safetensors [+ tokenizer.json])")
    src.add_argument("--random-init", metavar="CONFIG_OR_PRESET",
                     help="no weights: a preset name (tiny, small, 1b, kimi-linear-48b) or a config.json path")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on the GPU")


def _load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from hla.generation.bench import build_random_model
    from hla.generation.tokenizer import load_tokenizer
    from hla.models import KimiLinearConfig, load_model

    if args.model:
        return load_model(args.model, device=device, dtype=dtype), load_tokenizer(args.model)
    name = args.random_init
    if Path(name).is_file():
        config = KimiLinearConfig.from_json(name)
    else:
        config = KimiLinearConfig.preset(name)
    torch.manual_seed(0 if args.seed is None else args.seed)
    return build_random_model(config, device, dtype), load_tokenizer(None)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def run_generate(args: argparse.Namespace) -> int:
    from hla.generation.generate import stream
    from hla.generation.tokenizer import TextStreamer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = _load(args, device, dtype)
    config = model.config
    ids = tok.encode(args.prompt, add_bos=True)
    if max(ids) >= config.vocab_size:
        raise ValueError(
            f"--prompt encodes to ids up to {max(ids)}, beyond the model's vocab_size {config.vocab_size}"
        )
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    stops = None if args.ignore_eos or eos is None else [eos]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    text = TextStreamer(tok)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    sync()
    t0 = time.perf_counter()
    ts = stream(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_token_ids=stops,
                seed=args.seed, use_cuda_graph=False if args.no_cuda_graph else None)
    stamps: list[float] = []
    for _, token in ts:
        stamps.append(time.perf_counter())
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    t_end = time.perf_counter()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()

    n = len(stamps)
    print("-" * 60, file=sys.stderr)
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters, {dtype}, {device}"
          f"{' (random weights)' if args.random_init else ''}", file=sys.stderr)
    if n:
        print(f"prompt {len(ids)} tokens -> first token in {(stamps[0] - t0) * 1e3:.1f} ms", file=sys.stderr)
    if n > 1:
        dt = t_end - stamps[0]
        graph = ts.runner is not None and ts.runner.captured
        line = (f"decode {n - 1} tokens in {dt * 1e3:.1f} ms: {(n - 1) / dt:.1f} tokens/s "
                f"({'CUDA graph' if graph else 'eager'})")
        # The first steps warm up and capture the graph; the rest is the steady rate.
        skip = 8
        if n > 2 * skip:
            steady = (t_end - stamps[skip]) / (n - 1 - skip)
            line += f"; after {skip} tokens: {1 / steady:.1f} tokens/s, {steady * 1e3:.2f} ms/token"
        print(line, file=sys.stderr)
    if ts.cache is not None:
        from hla.generation.cache import predict_cache_bytes

        length = len(ids) + args.max_new_tokens
        # generate() rounds the cache's capacity up (aligned GEMMs); predict for that capacity.
        capacity = ts.cache.max_length
        pred = predict_cache_bytes(config, 1, capacity, dtype=dtype)
        print(f"cache: {_fmt_bytes(ts.cache.nbytes())} allocated for {capacity} positions ({length} used) "
              f"(predicted {_fmt_bytes(pred['total'])}: KDA state {_fmt_bytes(pred['kda_state'])}, "
              f"conv {_fmt_bytes(pred['kda_conv'])}, MLA latent {_fmt_bytes(pred['mla_latent'])})", file=sys.stderr)
    return 0
