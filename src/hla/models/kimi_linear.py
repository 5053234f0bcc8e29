"""The Kimi Linear causal LM: composition only (which layer is KDA or MLA, which FFN is MoE).

Module names equal the release checkpoint names (``model.layers.N.self_attn.q_proj.weight``...),
except the routed experts, which are stored stacked; ``hla.models.checkpoint`` holds the one
table mapping between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hla.layers.kda import KimiDeltaAttention
from hla.layers.mla import MultiheadLatentAttention
from hla.layers.mlp import SwiGLUMLP
from hla.layers.moe import SparseMoE
from hla.layers.norm import RMSNorm
from hla.layers.short_conv import ShortConvolution
from hla.models.config import KimiLinearConfig


@dataclass
class CausalLMOutput:
    """``logits: [B, T', vocab]`` (``T' = T``, or ``logits_to_keep``); ``loss``: scalar fp32 or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class KimiLinearDecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(input_layernorm(x))``, then ``x + ffn(post_attention_layernorm(x))``."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_mla = config.is_mla_layer(layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = (
            MultiheadLatentAttention(config, layer_idx) if self.is_mla else KimiDeltaAttention(config, layer_idx)
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class KimiLinearModel(nn.Module):
    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cache)
        return self.norm(x)


class KimiLinearForCausalLM(nn.Module):
    """Kimi Linear language model with an untied LM head (tied when ``tie_word_embeddings``).

    Build on the meta device (``with torch.device("meta"):``) to size a model without memory;
    ``hla.load_model`` does that and fills weights shard by shard.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (redo after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- weights --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init: normal(0, initializer_range) for matrices, ones for norms, FLA's KDA gate init."""
        if self.lm_head.weight.is_meta:  # nothing to fill; meta init is slow and pointless
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, ShortConvolution):
                m.reset_parameters()
            elif isinstance(m, SparseMoE):
                for p in (m.experts.w1, m.experts.w2, m.experts.w3, m.gate.weight):
                    nn.init.normal_(p, 0.0, std)
                nn.init.zeros_(m.gate.e_score_correction_bias)
        for m in self.modules():
            if isinstance(m, KimiDeltaAttention):
                m.reset_gate_parameters()

    def fp32_param_names(self) -> set[str]:
        """Names of parameters kept in fp32 whatever the model dtype (KDA gate and short convs, MoE router)."""
        names = set()
        for mod_name, m in self.named_modules():
            for p in getattr(m, "fp32_params", ()):
                names.add(f"{mod_name}.{p}" if mod_name else p)
        return names

    def to_dtype(self, dtype: torch.dtype) -> KimiLinearForCausalLM:
        """Cast to ``dtype`` keeping ``A_log``, ``dt_bias``, the short-conv weights, the router weight and
        the correction bias in fp32 (float64 models keep everything in float64). ``.to(dtype)`` does the same."""
        keep = self.fp32_param_names() if dtype != torch.float64 else set()
        for name, p in self.named_parameters():
            target = torch.float32 if name in keep else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
        return self

    def to(self, *args, **kwargs) -> KimiLinearForCausalLM:
        """``nn.Module.to`` that keeps the fp32 tensors fp32 when given a dtype (see ``to_dtype``)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            self.to_dtype(dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache=None,
        *,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """
        Args:
            input_ids: ``[B, T]`` long.
            labels: ``[B, T]`` long or None; position ``t`` predicts ``labels[:, t + 1]`` (shifted
                here); ``-100`` is ignored. The loss is the mean over counted positions, in fp32.
            cache: a ``hla.generation.cache.HybridCache`` or None. Row ``b``'s tokens take positions
                ``cache.lengths[b] + [0, T)``; afterwards ``cache.lengths += T``.
            logits_to_keep: if > 0, only the last ``logits_to_keep`` positions' logits are computed
                (prefill for generation needs one); incompatible with ``labels``.

        Returns:
            ``CausalLMOutput(logits [B, T or logits_to_keep, vocab] in the model dtype, loss)``.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids: expected a [B, T] integer tensor, got shape {tuple(input_ids.shape)} "
                f"dtype {input_ids.dtype}"
            )
        B, T = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep: must be 0 when labels are given")
        if cache is not None:
            cache.check_room(B, T)
        h = self.model(input_ids, cache)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).long(),
                ignore_index=-100,
            )
        return CausalLMOutput(logits=logits, loss=loss)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None) -> KimiLinearForCausalLM:
        """Same as ``hla.load_model(path, device=..., dtype=...)``."""
        from hla.models.checkpoint import load_model

        return load_model(path, device=device, dtype=dtype)

    # ---- generation and saving (implemented elsewhere, imported lazily) -------------------------------
    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """See ``hla.generation.generate``."""
        from hla.generation import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def stream(self, prompts, max_new_tokens: int, **kwargs):
        """See ``hla.generation.stream``."""
        from hla.generation import stream

        return stream(self, prompts, max_new_tokens, **kwargs)

    def save_pretrained(self, path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write ``config.json`` + release-named safetensors shards (+ index) to directory ``path``."""
        from hla.models.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
