"""Run the model's one-token decode step, captured in a CUDA graph on the GPU.

A decode step of a ~1B model launches hundreds of small kernels; at batch 1 the host's launch
time, not the GPU, sets the pace. A CUDA graph replays the whole step with one launch. It needs
static buffers: the cache already is one (preallocated, updated in place, ``lengths`` on the
device), so only the input ids and the output logits get a fixed home here.

The first ``warmup_steps`` calls run eagerly (cuBLAS handles, Triton compiles and autotuning
happen there, never inside a capture); they are real decode steps whose results are returned,
so the warm-up costs no extra work and leaves the cache exactly as a plain loop would. The next
call captures the step and replays it; capturing does not execute kernels, so
it does not advance the cache either.

``HybridCache`` keeps a host-side mirror of the longest row's length (to bound MLA's key span
and check ``max_length`` without a device read). A replay runs no Python, so the runner keeps
that mirror in step, and pins ``static_key_span`` to ``max_length`` so every replay attends over
the same number of (masked) latent slots.
"""

from __future__ import annotations

import torch


def _last_logits(model: torch.nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    out = model(input_ids, cache=cache)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1]


class DecodeRunner:
    """Calls ``model(input_ids [B, 1], cache=cache)`` and returns the logits ``[B, vocab]``.

    Args:
        model: a model honouring the cache contract (decode step without host sync).
        cache: the cache this runner advances; its batch size ``B`` is fixed for the runner.
        use_graph: ``True`` captures a CUDA graph (CUDA only), ``False`` stays eager,
            ``None`` captures when the cache lives on a CUDA device.
        warmup_steps: eager steps before the capture.

    The returned logits of a graphed step live in a static buffer that the next call
    overwrites: consume them (sample) before calling again.
    """

    def __init__(self, model: torch.nn.Module, cache, *, use_graph: bool | None = None, warmup_steps: int = 2):
        device = cache.lengths.device
        if use_graph is None:
            use_graph = device.type == "cuda"
        if use_graph and device.type != "cuda":
            raise ValueError(f"use_graph=True needs a CUDA cache, got a cache on {device}")
        if warmup_steps < 1 and use_graph:
            raise ValueError(f"warmup_steps must be >= 1 before a CUDA graph capture, got {warmup_steps}")
        self.model = model
        self.cache = cache
        if use_graph and hasattr(cache, "static_key_span"):
            # Pinned before the warm-up too, so the warm-up compiles the shapes the graph will use.
            cache.static_key_span = cache.max_length
        self.batch_size = int(cache.lengths.shape[0])
        self.use_graph = bool(use_graph)
        self.warmup_steps = warmup_steps
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_ids: torch.Tensor | None = None
        self._static_logits: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape != (self.batch_size, 1) or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be long [{self.batch_size}, 1], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        self._calls += 1
        if not self.use_graph:
            return _last_logits(self.model, input_ids, self.cache)
        if self._graph is None and self._calls <= self.warmup_steps:
            return _last_logits(self.model, input_ids, self.cache)
        if self._graph is None:
            # Capturing runs the model's Python once, which advances the host mirror for this step.
            self._capture(input_ids)
        else:
            if hasattr(self.cache, "check_room"):
                self.cache.check_room(self.batch_size, 1)
            if hasattr(self.cache, "_host_max_length"):
                self.cache._host_max_length += 1
        self._static_ids.copy_(input_ids)
        self._graph.replay()
        return self._static_logits

    def _capture(self, input_ids: torch.Tensor) -> None:
        self._static_ids = input_ids.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_logits = _last_logits(self.model, self._static_ids, self.cache)
        self._graph = graph
