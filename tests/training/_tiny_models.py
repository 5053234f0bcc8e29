"""Tiny Kimi Linear models for the training tests (importable by the torchrun worker too)."""

import torch

from hla.models import KimiLinearConfig, KimiLinearForCausalLM


def tiny_config(vocab_size: int) -> KimiLinearConfig:
    # the "tiny" preset cut to 2 layers (one KDA, one MLA), dense MLPs and the task's vocabulary: both mixers
    # are exercised while a CPU step stays cheap
    tiny = KimiLinearConfig.preset("tiny")
    lac = dict(tiny.linear_attn_config, full_attn_layers=[2], kda_layers=[1])
    return tiny.replace(vocab_size=vocab_size, num_hidden_layers=2, linear_attn_config=lac, first_k_dense_replace=2,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_tiny_model(vocab_size: int, seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(tiny_config(vocab_size))
