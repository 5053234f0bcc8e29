"""Tiny Kimi Linear models for the training tests (importable by the torchrun worker too)."""

import torch

from hla.models import KimiLinearConfig, KimiLinearForCausalLM


def tiny_config(vocab_size: int) -> KimiLinearConfig:
    # the "tiny" preset (KKKM, 64 wide, MoE) with the task's vocabulary and no MoE, to keep CPU steps fast
    return KimiLinearConfig.preset("tiny").replace(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None,
                                                   pad_token_id=None, first_k_dense_replace=4)


def build_tiny_model(vocab_size: int, seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(tiny_config(vocab_size))
