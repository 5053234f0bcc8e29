"""Tiny Kimi Linear models for the training tests (importable by the torchrun worker too)."""

import torch

from hla.models import KimiLinearConfig, KimiLinearForCausalLM


def tiny_config(vocab_size: int, moe_tied: bool = False) -> KimiLinearConfig:
    # the "tiny" preset cut to 2 layers (one KDA, one MLA), dense MLPs and the task's vocabulary: both mixers
    # are exercised while a CPU step stays cheap. moe_tied: the MLA layer gets the MoE and the embedding is tied
    # to the LM head (the FSDP test covers the router's fp32 group and tied-weight checkpoints with it)
    tiny = KimiLinearConfig.preset("tiny")
    lac = dict(tiny.linear_attn_config, full_attn_layers=[2], kda_layers=[1])
    return tiny.replace(vocab_size=vocab_size, num_hidden_layers=2, linear_attn_config=lac,
                        first_k_dense_replace=1 if moe_tied else 2, tie_word_embeddings=moe_tied,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_tiny_model(vocab_size: int, seed: int = 0, moe_tied: bool = False) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(tiny_config(vocab_size, moe_tied))
