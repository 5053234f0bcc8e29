"""``hla demo``: the project's main job on this machine (grows with the project)."""

from __future__ import annotations

import argparse

import torch

from hla.ops.kda import kda_gate, kda_reference, l2norm


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    B, T, H, K = 1, 64, 2, 32
    q = l2norm(torch.randn(B, T, H, K, dtype=torch.float64))
    k = l2norm(torch.randn(B, T, H, K, dtype=torch.float64))
    v = torch.randn(B, T, H, K, dtype=torch.float64)
    g = kda_gate(torch.randn(B, T, H, K, dtype=torch.float64), torch.zeros(H, dtype=torch.float64))
    beta = torch.rand(B, T, H, dtype=torch.float64)
    o, s = kda_reference(q, k, v, g, beta, output_final_state=True)
    print(f"KDA reference: o {tuple(o.shape)} state {tuple(s.shape)} |o| = {o.norm():.4f}")
    return 0
