"""The hybrid cache: fixed-size KDA state + MLA latent cache, preallocated static buffers.

Per KDA layer: the short-convolution windows of q, k, v (the last ``W - 1`` inputs, model dtype)
and the recurrent state ``[B, H, K, V]`` in fp32. Per MLA layer: the normalised latent
``[B, max_length, kv_lora_rank]`` and the shared ``k_pe [B, max_length, qk_rope_head_dim]`` (model
dtype), i.e. 576 values per token for the 48B model, never expanded K/V. ``lengths [B]`` (device,
long) counts the tokens already cached per row; rows may differ (after ``stack``).

Buffers are allocated once (zeros, so masked slots never hold NaN) and updated in place, so a
decode step can be captured in a CUDA graph. The longest row's length is also tracked on the host
(every forward advances all rows by the same T), which bounds the MLA key span and checks
``max_length`` without reading ``lengths`` back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KDALayerCache:
    """``conv_q/conv_k/conv_v: [B, D, W-1]`` (model dtype), ``state: [B, H, K, V]`` fp32."""

    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    state: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_q, self.conv_k, self.conv_v, self.state]


@dataclass
class MLALayerCache:
    """``latent: [B, L, kv_lora_rank]``, ``k_pe: [B, L, qk_rope_head_dim]`` (model dtype)."""

    latent: torch.Tensor
    k_pe: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent, self.k_pe]


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # Recurrent state accumulates in fp32 (float64 models keep float64 for exact tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


class HybridCache:
    """Inference state of a Kimi Linear model for ``batch_size`` rows of up to ``max_length`` tokens.

    Attributes:
        kda: ``{layer_idx: KDALayerCache}``; mla: ``{layer_idx: MLALayerCache}``.
        lengths: ``[B]`` long on ``device``, tokens cached per row.
        static_key_span: None, or an int >= every row's length + T: MLA then attends over exactly
            that many slots (for CUDA graphs, whose shapes must not change between replays).
    """

    def __init__(self, config, kda: dict, mla: dict, lengths: torch.Tensor, max_length: int,
                 dtype: torch.dtype, host_max_length: int) -> None:
        self.config = config
        self.kda = kda
        self.mla = mla
        self.lengths = lengths
        self.max_length = max_length
        self.dtype = dtype
        self.static_key_span: int | None = None
        self._host_max_length = host_max_length

    @classmethod
    def allocate(cls, config, batch_size: int, max_length: int, *, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> HybridCache:
        """Zero-filled cache for ``batch_size`` rows of at most ``max_length`` tokens."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        B = batch_size
        H, K = config.kda_num_heads, config.kda_head_dim
        W = config.kda_conv_size
        kda, mla = {}, {}
        for i in range(config.num_hidden_layers):
            if config.is_mla_layer(i):
                mla[i] = MLALayerCache(
                    latent=torch.zeros(B, max_length, config.kv_lora_rank, device=device, dtype=dtype),
                    k_pe=torch.zeros(B, max_length, config.qk_rope_head_dim, device=device, dtype=dtype),
                )
            else:
                kda[i] = KDALayerCache(
                    *(torch.zeros(B, H * K, W - 1, device=device, dtype=dtype) for _ in range(3)),
                    state=torch.zeros(B, H, K, K, device=device, dtype=_state_dtype(dtype)),
                )
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        return cls(config, kda, mla, lengths, max_length, dtype, 0)

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def host_max_length(self) -> int:
        """The longest row's length, known on the host (no device sync)."""
        return self._host_max_length

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for c in list(self.kda.values()) + list(self.mla.values()):
            out.extend(c.tensors())
        return out

    def nbytes(self) -> int:
        """Bytes of the cache buffers (conv windows, states, latents; not the lengths vector)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ---- used by the model's forward ------------------------------------------------------------------
    def check_room(self, batch_size: int, num_tokens: int) -> None:
        """Raise ValueError unless a call with ``[batch_size, num_tokens]`` fits."""
        if batch_size != self.batch_size:
            raise ValueError(f"input_ids: batch size {batch_size} does not match the cache's {self.batch_size}")
        if self._host_max_length + num_tokens > self.max_length:
            raise ValueError(
                f"cache: {self._host_max_length} cached + {num_tokens} new tokens exceeds max_length "
                f"{self.max_length}; allocate a larger cache"
            )

    def key_span(self, num_tokens: int) -> int:
        """Number of MLA slots a call of ``num_tokens`` new tokens attends over (a host int)."""
        if self.static_key_span is not None:
            return self.static_key_span
        return min(self.max_length, self._host_max_length + num_tokens)

    def advance(self, num_tokens: int) -> None:
        """All rows took ``num_tokens`` more tokens (in place, graph-capturable)."""
        self.lengths.add_(num_tokens)
        self._host_max_length += num_tokens

    def reset(self) -> None:
        """Empty every row (zero the buffers and lengths)."""
        for t in self.tensors():
            t.zero_()
        self.lengths.zero_()
        self._host_max_length = 0

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Overwrite the per-row lengths (syncs once to learn the maximum)."""
        if lengths.shape != self.lengths.shape:
            raise ValueError(f"lengths: expected shape {tuple(self.lengths.shape)}, got {tuple(lengths.shape)}")
        m = int(lengths.max())
        if m > self.max_length or int(lengths.min()) < 0:
            raise ValueError(f"lengths: values must be in [0, {self.max_length}], got max {m}")
        self.lengths.copy_(lengths)
        self._host_max_length = m

    # ---- batch surgery ----------------------------------------------------------------------------------
    @classmethod
    def stack(cls, caches: list[HybridCache], max_length: int | None = None) -> HybridCache:
        """Concatenate rows of several caches (same config, dtype, device); lengths stay per row."""
        if not caches:
            raise ValueError("caches: expected at least one cache")
        first = caches[0]
        for c in caches[1:]:
            if c.config.schedule_string() != first.config.schedule_string() or c.dtype != first.dtype:
                raise ValueError("caches: all caches must come from the same config and dtype")
        host = max(c._host_max_length for c in caches)
        L = max(c.max_length for c in caches) if max_length is None else max_length
        if L < host:
            raise ValueError(f"max_length: {L} is shorter than the longest cached row ({host})")
        kda = {
            i: KDALayerCache(*(torch.cat([getattr(c.kda[i], f) for c in caches])
                               for f in ("conv_q", "conv_k", "conv_v", "state")))
            for i in first.kda
        }
        mla = {}
        for i in first.mla:
            parts = {}
            for f in ("latent", "k_pe"):
                bufs = []
                for c in caches:
                    src = getattr(c.mla[i], f)
                    buf = src.new_zeros(src.shape[0], L, src.shape[2])
                    n = min(L, src.shape[1])
                    buf[:, :n] = src[:, :n]
                    bufs.append(buf)
                parts[f] = torch.cat(bufs)
            mla[i] = MLALayerCache(**parts)
        lengths = torch.cat([c.lengths for c in caches])
        return cls(first.config, kda, mla, lengths, L, first.dtype, host)

    def select(self, rows) -> HybridCache:
        """A new cache holding only ``rows`` (list or long tensor of row indices), in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        kda = {i: KDALayerCache(*(t.index_select(0, idx) for t in c.tensors())) for i, c in self.kda.items()}
        mla = {i: MLALayerCache(*(t.index_select(0, idx) for t in c.tensors())) for i, c in self.mla.items()}
        out = HybridCache(self.config, kda, mla, self.lengths.index_select(0, idx), self.max_length, self.dtype,
                          self._host_max_length)
        return out


def predict_cache_bytes(config, batch_size: int, context_length: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes ``HybridCache.allocate(config, batch_size, context_length, dtype=dtype)`` holds, by part.

    Returns ``dict(kda_state=..., kda_conv=..., mla_latent=..., total=...)`` (ints).
    """
    el = torch.empty(0, dtype=dtype).element_size()
    st = torch.empty(0, dtype=_state_dtype(dtype)).element_size()
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.kda_conv_size
    n_kda, n_mla = config.num_kda_layers, config.num_mla_layers
    kda_state = n_kda * batch_size * H * K * K * st
    kda_conv = n_kda * batch_size * 3 * H * K * (W - 1) * el
    mla_latent = n_mla * batch_size * context_length * (config.kv_lora_rank + config.qk_rope_head_dim) * el
    return {
        "kda_state": kda_state,
        "kda_conv": kda_conv,
        "mla_latent": mla_latent,
        "total": kda_state + kda_conv + mla_latent,
    }
