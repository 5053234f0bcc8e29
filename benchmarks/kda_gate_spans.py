"""How often the intra stage's cheap pair-decay products are valid, on the benchmark's gate statistics.

The forward intra stage (src/hla/ops/kda/triton/intra.py) writes a pair decay exp(Gamma_i - Gamma_j)
as a product of two factors through an anchor row a. Pairs in different blocks of a level are exact
(both factors <= 1); pairs inside one block of B rows share one anchor (row B/2 - 1 of the block),
and that product is only safe when no factor exceeds exp(SAFE_SPAN) (intra.py: 80 with the l2norm
fused). Tier t (1..5): the exact levels that split blocks of 64, 32, ... rows into halves of 32, 16,
..., 64 >> t rows, then one anchor per block of B = 64 >> t rows (32 = the fast pass, 16, 8, 4, 2);
tier 6: all six levels (always valid). Per (chunk, head, key block of 64 channels) this prints the
smallest valid tier, per chunk-head the largest over its key blocks. The first column is the fast
pass's own test (`half_anchors`, slightly conservative); the others use the exact span max |Gamma_i
- Gamma_a|.

    PYTHONPATH=src python3 benchmarks/kda_gate_spans.py [--T 1024] [--H 32] [--D 128] [--seeds 8]

Inputs as `prefill_inputs` in benchmarks/kda_kernels.py: raw gate ~ N(0, 1), A_log = log U(1, 16),
dt_bias ~ N(-3, 0.5) per channel, Kimi gate g = -exp(A_log) softplus(raw + dt_bias), float64, CPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hla.ops.kda.triton.intra import SAFE_SPAN

BT, BK = 64, 64


def chunk_gamma(T: int, H: int, D: int, gen: torch.Generator, gate: str) -> torch.Tensor:
    """In-chunk cumulative log-decay [NC, BT, H, D] float64 (the kernel's Gamma)."""
    f64 = torch.float64
    raw = torch.randn(T, H, D, generator=gen, dtype=f64)
    a = torch.empty(H, dtype=f64).uniform_(1, 16, generator=gen)
    bias = (torch.randn(H * D, generator=gen, dtype=f64) * 0.5 - 3).view(H, D)
    if gate == "safe":
        g = -5.0 * torch.sigmoid(a[:, None] * (raw + bias))
    else:
        g = -a[:, None] * F.softplus(raw + bias)
    return g.view(T // BT, BT, H, D).cumsum(1)


def tier_spans(G: torch.Tensor) -> list[torch.Tensor]:
    """Per tier 1..5: the largest |Gamma_i - Gamma_anchor(i)| over each key block, [NC, H, NK]."""
    NC, _, H, D = G.shape
    rows = torch.arange(BT)
    out = []
    for t in range(1, 6):
        B = BT >> t
        anchor = rows // B * B + B // 2 - 1
        dev = (G - G[:, anchor]).abs()  # [NC, BT, H, D]
        out.append(dev.view(NC, BT, H, D // BK, BK).amax(dim=(1, 4)))
    return out


def fast_test_span(G: torch.Tensor) -> torch.Tensor:
    """The fast pass's test as coded in common.half_anchors (uses 0 - Gamma_15 for the first quarter)."""
    NC, _, H, D = G.shape
    G1, G2, G3, Gl = G[:, 15], G[:, 31], G[:, 47], G[:, 63]
    s = torch.stack([-G1, G1 - G2, G2 - G3, G3 - Gl]).amax(0)  # [NC, H, D]
    return s.view(NC, H, D // BK, BK).amax(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    print(f"T {args.T}, H {args.H}, D {args.D}, {args.seeds} draws of the inputs (new A_log, dt_bias each), "
          f"SAFE_SPAN {SAFE_SPAN:g}\n")
    print("| gate | unit | fast test fails | needs tier >= 2 | >= 3 | >= 4 | >= 5 | = 6 | "
          "products per key block: per chunk-head, six levels | per key block, six levels | "
          "per key block, tiers 1, 2, 6 | every tier |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for gate in ("kimi", "safe"):
        fast, tiers = [], []
        for seed in range(args.seeds):
            G = chunk_gamma(args.T, args.H, args.D, torch.Generator().manual_seed(seed), gate)
            spans = tier_spans(G)
            # the smallest t with span_t <= SAFE_SPAN: spans shrink with t, so count the failing tiers
            need = 1 + sum((s > SAFE_SPAN).long() for s in spans)
            fast.append(fast_test_span(G) > SAFE_SPAN)
            tiers.append(need)
        fast, need = torch.cat([f.flatten(1) for f in fast]), torch.cat([n.flatten(1) for n in tiers])
        fast_b = fast.view(-1, args.D // BK)
        need_b = need.view(-1, args.D // BK)
        for unit, f, n in (("key block", fast_b.flatten(), need_b.flatten()),
                           ("chunk-head", fast_b.any(-1), need_b.amax(-1))):
            fr = [f.double().mean().item()] + [(n >= t).double().mean().item() for t in range(2, 6)]
            fr.append((n == 6).double().mean().item())
            cells = " | ".join(f"{100 * x:.1f}%" for x in fr)
            if unit == "key block":
                # tensor-core products per key block. Now: 2 (fast) + 6 for every key block of a
                # flagged chunk-head. Per-block tiers: a key block of tier 1 keeps its 2; a flagged one
                # keeps the fast pass's level-32 product and adds, in the exact launch, levels 16 .. 64 >> t
                # and one anchor product (t = 2..5: t products) or levels 16 .. 1 (tier 6: 5 products).
                now = 2 + 6 * fast_b.any(-1, keepdim=True).expand_as(fast_b).double().mean().item()
                new = torch.where(n == 1, 2, torch.where(n == 6, 6, 1 + n)).double().mean().item()
                # per-key-block flags with the six levels only, then what intra.py implements (tier 2
                # or else the six levels)
                six = torch.where(f, 6, 2).double().mean().item()
                two = torch.where(n == 1, 2, torch.where(n == 2, 3, 6)).double().mean().item()
                print(f"| {gate} | {unit} | {cells} | {now:.2f} | {six:.2f} | {two:.2f} | {new:.2f} |")
            else:
                print(f"| {gate} | {unit} | {cells} | | | | |")
        per_draw = fast.view(args.seeds, -1, args.D // BK).any(-1).double().mean(-1)
        print(f"| {gate} | chunk-heads failing the fast test, per draw | "
              + ", ".join(f"{100 * x:.0f}%" for x in per_draw.tolist()) + " | | | | | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
