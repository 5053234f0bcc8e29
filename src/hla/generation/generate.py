"""Autoregressive generation over the hybrid cache: prefill, then decode all rows together.

Prompts of different lengths are prefilled one by one into caches of one row each, then
stacked into one batched cache (``HybridCache.stack``); from there every decode step is a single
``[B, 1]`` call, graph-captured on the GPU (``DecodeRunner``). Rows that hit a stop token keep
riding along (fixed shapes keep the graph valid) but emit nothing more.

Long prompts are prefilled in chunks of ``prefill_chunk_size`` tokens, which bounds the
activations (and the logits, for a model that cannot keep only the last position's: a 64K-token
prompt times a 160K vocabulary would not fit). Chunking is exact because a multi-token call on a
non-empty cache continues its state.

On CUDA the next decode step is launched before the current one's tokens are handed out, and
the tokens travel through pinned memory, so a streaming consumer's host work overlaps the GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch

from hla.generation.graph import DecodeRunner
from hla.generation.sampling import SamplingParams, make_generator, sample

Prompts = Sequence[Sequence[int]] | torch.Tensor
SLOT_ALIGN = 64


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    # Some parameters (A_log, dt_bias, router) stay fp32 in a bf16 model: the largest one tells
    # the compute dtype.
    largest = max(model.parameters(), key=lambda p: p.numel())
    return largest.device, largest.dtype


def _cache_class(model: torch.nn.Module):
    cls = getattr(model, "cache_class", None)
    if cls is None:
        from hla.generation.cache import HybridCache

        cls = HybridCache
    return cls


def _normalise_prompts(prompts: Prompts, vocab_size: int | None) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"prompts tensor must be integer [B, T], got {prompts.dtype} {tuple(prompts.shape)}"
            )
        rows = prompts.tolist()
    else:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of token-id lists or a [B, T] tensor, got {type(prompts)}")
        if len(prompts) and not isinstance(prompts[0], (Sequence, torch.Tensor)):
            raise ValueError("prompts must be a list of prompts (lists of token ids), got a flat list; wrap it: [ids]")
        rows = [p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p] for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if vocab_size is not None and (min(r) < 0 or max(r) >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): min {min(r)}, max {max(r)}")
    return rows


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_last(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Prefill ``ids [B, T]`` into ``cache`` in chunks; return the last position's logits ``[B, vocab]``."""
    kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = None
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], cache=cache, **kw)
        logits = (out.logits if hasattr(out, "logits") else out)[:, -1]
    return logits


def prefill(
    model: torch.nn.Module, rows: list[list[int]], max_length: int, *, prefill_chunk_size: int = 4096
):
    """Run every prompt (``rows``: token-id lists) through the model into one batched cache of
    ``max_length`` positions; equal-length prompts go through together, others one by one.

    Returns ``(cache, logits [B, vocab])`` with the logits of each prompt's last token.
    """
    device, dtype = _model_device_dtype(model)
    cls = _cache_class(model)
    if len({len(r) for r in rows}) == 1:
        cache = cls.allocate(model.config, len(rows), max_length, device=device, dtype=dtype)
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        return cache, _forward_last(model, ids, cache, prefill_chunk_size)
    caches, logits = [], []
    for r in rows:
        c = cls.allocate(model.config, 1, len(r), device=device, dtype=dtype)
        ids = torch.tensor([r], dtype=torch.long, device=device)
        logits.append(_forward_last(model, ids, c, prefill_chunk_size))
        caches.append(c)
    return cls.stack(caches, max_length=max_length), torch.cat(logits, 0)


def _decode_steps(
    model: torch.nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stop_token_ids: Sequence[int] | None,
    seed: int | None,
    use_cuda_graph: bool | None,
    prefill_chunk_size: int,
    info: dict | None = None,
) -> Iterator[_Step]:
    """Validate everything now, then return an iterator of ``_Step`` (tokens and emitted flags of
    one step) that never syncs with the host itself."""
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be an int >= 1, got {prefill_chunk_size!r}")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    rows = _normalise_prompts(prompts, vocab_size)
    limit = getattr(getattr(model, "config", None), "model_max_length", None)
    longest = max(len(r) for r in rows)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"model_max_length {limit}"
        )
    stops = [] if stop_token_ids is None else [int(t) for t in stop_token_ids]
    device, _ = _model_device_dtype(model)
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs a model on a CUDA device, the model is on {device}")
    generator = make_generator(seed, device)
    info = {} if info is None else info
    return _decode_loop(
        model, rows, max_new_tokens, params, stops, generator, use_cuda_graph, prefill_chunk_size, info
    )


@torch.no_grad()
def _decode_loop(model, rows, max_new_tokens, params, stops, generator, use_cuda_graph, prefill_chunk_size, info):
    if max_new_tokens == 0:
        return
    device, _ = _model_device_dtype(model)
    # Capacity rounded up to 64 slots: the CUDA graph attends over all of them (masked), and an
    # odd key count makes cuBLAS fall back to unaligned kernels several times slower.
    need = max(len(r) for r in rows) + max_new_tokens
    cache, logits = prefill(model, rows, -(-need // SLOT_ALIGN) * SLOT_ALIGN, prefill_chunk_size=prefill_chunk_size)
    B, vocab = logits.shape
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r, device=device)] = True
    stop = torch.tensor(stops, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    runner = DecodeRunner(model, cache, use_graph=use_cuda_graph)
    info.update(cache=cache, runner=runner)
    # On CUDA each step's tokens go to pinned host memory asynchronously and the next step is
    # launched before this one is handed out: a streaming consumer that waits for its tokens
    # overlaps its own work (detokenising, printing) with the GPU computing the next step.
    host = torch.empty(2, B, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
    for step in range(max_new_tokens):
        tokens = sample(logits, params, generator=generator, seen=seen)
        emitted = ~finished
        ready = None
        if host is not None:
            host.copy_(torch.stack([tokens, emitted.long()]), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        last = step + 1 == max_new_tokens
        if not last:
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if stops:
                finished = finished | torch.isin(tokens, stop)
            logits = runner(tokens[:, None])
        yield _Step(tokens, emitted, host, ready)
        if last:
            break


class _Step:
    """One decode step: ``tokens [B]`` long and ``emitted [B]`` bool on the device, and on CUDA a
    pinned host copy ``host [2, B]`` that is valid once ``ready`` has completed (until the next step)."""

    __slots__ = ("tokens", "emitted", "host", "ready")

    def __init__(self, tokens, emitted, host, ready):
        self.tokens, self.emitted, self.host, self.ready = tokens, emitted, host, ready

    def to_lists(self) -> tuple[list[int], list[bool]]:
        if self.ready is None:
            return self.tokens.tolist(), self.emitted.tolist()
        self.ready.synchronize()
        toks, live = self.host.tolist()
        return toks, [bool(e) for e in live]


def generate(
    model: torch.nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    use_cuda_graph: bool | None = None,
    prefill_chunk_size: int = 4096,
    check_every: int = 16,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` new tokens for each prompt.

    Args:
        model: a causal LM honouring the cache contract (``model(ids, cache=cache).logits``).
        prompts: list of token-id lists (any lengths >= 1), or a long tensor ``[B, T]``.
        max_new_tokens: tokens to generate per prompt at most.
        temperature, top_k, top_p, repetition_penalty: see ``SamplingParams`` (temperature 0 = greedy).
        stop_token_ids: a row stops after emitting one of these; the stop token is included in
            its output.
        seed: seeds a generator on the model's device, making sampling reproducible.
        use_cuda_graph: capture the decode step in a CUDA graph (default: on CUDA devices).
        prefill_chunk_size: prompt tokens per prefill call (bounds the logits' memory).
        check_every: decode steps between host checks whether every row has stopped.

    Returns:
        For each prompt, the list of its new token ids.
    """
    out_tokens: list[torch.Tensor] = []
    out_emitted: list[torch.Tensor] = []
    for i, st in enumerate(
        _decode_steps(
            model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed,
            use_cuda_graph=use_cuda_graph, prefill_chunk_size=prefill_chunk_size,
        )
    ):
        out_tokens.append(st.tokens)
        out_emitted.append(st.emitted)
        # The early exit reads the device, so only every few steps: the GPU runs ahead meanwhile.
        if stop_token_ids and (i + 1) % check_every == 0 and not bool(st.emitted.any()):
            break
    if not out_tokens:
        n = len(_normalise_prompts(prompts, None))
        return [[] for _ in range(n)]
    tokens = torch.stack(out_tokens, 1).tolist()
    emitted = torch.stack(out_emitted, 1).tolist()
    return [[t for t, e in zip(tr, er, strict=True) if e] for tr, er in zip(tokens, emitted, strict=True)]


def stream(
    model: torch.nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    use_cuda_graph: bool | None = None,
    prefill_chunk_size: int = 4096,
) -> TokenStream:
    """Like ``generate`` but yields ``(row, token_id)`` as soon as each token exists.

    Within a step, rows come in order; a row that stopped yields nothing more. Collecting the
    tokens per row gives exactly ``generate``'s result for the same arguments. Bad arguments
    raise here, before the first token.
    """
    ts = TokenStream()
    ts._steps = _decode_steps(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed,
        use_cuda_graph=use_cuda_graph, prefill_chunk_size=prefill_chunk_size, info=ts.info,
    )
    return ts


class TokenStream:
    """Iterator of ``(row, token_id)`` returned by ``stream``.

    After the first token, ``cache`` is the batched cache being decoded into (for ``nbytes()``)
    and ``runner`` the ``DecodeRunner`` (``runner.captured`` tells whether a CUDA graph runs).
    """

    def __init__(self) -> None:
        self.info: dict = {}
        self._steps: Iterator[_Step] | None = None
        self._rows = self._iter_rows()

    @property
    def cache(self):
        return self.info.get("cache")

    @property
    def runner(self) -> DecodeRunner | None:
        return self.info.get("runner")

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[int, int]:
        return next(self._rows)

    def _iter_rows(self) -> Iterator[tuple[int, int]]:
        for st in self._steps:
            toks, live = st.to_lists()
            if not any(live):
                return
            for row, (t, e) in enumerate(zip(toks, live, strict=True)):
                if e:
                    yield row, t
