"""How precisely the intra stage's inverse M = (I + diag(beta) P)^-1 can be formed from bf16x3 tensor-core
products, without a GPU (float64 model).

Today's solve (intra.kda_intra_solve_kernel) inverts the four 16 x 16 diagonal blocks by the product form
(I + N)^-1 = (I - N)(I + N^2)(I + N^4)(I + N^8) and fills the blocks below by substitution, M_IJ = -D_I sum_L A_IL
M_LJ, every product in bf16x3 (hi*hi + hi*lo + lo*hi of the operands' bf16 halves, fp32 accumulation). A solve fused
into a wgmma launch would rather take [64, 64] products: the product form over the whole chunk,
(I - N)(I + N^2)(I + N^4)(I + N^8)(I + N^16)(I + N^32). This script forms P from check_kda_gpu.py's inputs (float64),
builds M both ways with the rounding of bf16x3 products and prints M's relative error against the float64 inverse,
the worst chunk-head and the median, per gate.

    PYTHONPATH=src python3 benchmarks/kda_inverse_model.py [--gates kimi,near0,veryneg,safe] [--T 2048]
        [--key-directions 4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from check_kda_gpu import make_inputs  # noqa: E402
from hla.ops.kda.chunk_torch import chunk_kda_intra  # noqa: E402
from hla.ops.kda.gate import l2norm  # noqa: E402
from kda_premultiplied_model import chunked_inputs  # noqa: E402

BT = 64


def fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def bf16x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as three bf16 products of the operands' hi / lo halves, summed in float64 and rounded to fp32."""
    def halves(x):
        hi = x.to(torch.bfloat16).double()
        return hi, (x - hi).to(torch.bfloat16).double()
    (ah, al), (bh, bl) = halves(a), halves(b)
    return fp32(ah @ bh + ah @ bl + al @ bh)


def inverse_blocks(N: torch.Tensor) -> torch.Tensor:
    """Today's solve: product-form 16 x 16 diagonal inverses, then block substitution (bf16x3 products)."""
    eye16 = torch.eye(16, dtype=N.dtype)
    D, M = [], torch.zeros_like(N)
    for i in range(4):
        n = N[..., 16 * i:16 * i + 16, 16 * i:16 * i + 16]
        x, p = fp32(eye16 - n), n
        for _ in range(3):  # (I + N^2)(I + N^4)(I + N^8)
            p = bf16x3(p, p)
            x = bf16x3(x, eye16 + p)
        D.append(x)
        M[..., 16 * i:16 * i + 16, 16 * i:16 * i + 16] = x
    for i in range(1, 4):
        for j in range(i - 1, -1, -1):
            acc = 0
            for m in range(j, i):
                acc = acc + bf16x3(N[..., 16 * i:16 * i + 16, 16 * m:16 * m + 16], M[..., 16 * m:16 * m + 16,
                                                                                          16 * j:16 * j + 16])
            M[..., 16 * i:16 * i + 16, 16 * j:16 * j + 16] = -bf16x3(D[i], fp32(acc))
    return M


def inverse_product_form(N: torch.Tensor) -> torch.Tensor:
    """The whole-chunk product form (I - N)(I + N^2)...(I + N^32), bf16x3 products of [64, 64] tiles."""
    eye = torch.eye(N.shape[-1], dtype=N.dtype)
    x, p = fp32(eye - N), N
    for _ in range(5):
        p = bf16x3(p, p)
        x = bf16x3(x, eye + p)
    return x


def _block_masks(n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] masks of the 16 x 16 diagonal blocks and of the blocks below them."""
    blk = torch.arange(n) // 16
    diag = (blk[:, None] == blk[None, :]).to(dtype)
    return diag, (blk[:, None] > blk[None, :]).to(dtype)


def _diag_inverse_64(N: torch.Tensor) -> torch.Tensor:
    """The four 16 x 16 diagonal inverses at once, as [64, 64] products of the block-diagonal part (zeros
    elsewhere stay zero: the same terms as the 16 x 16 products)."""
    diag, _ = _block_masks(N.shape[-1], N.dtype)
    eye = torch.eye(N.shape[-1], dtype=N.dtype)
    nd = N * diag
    x, p = fp32(eye - nd), nd
    for _ in range(3):
        p = bf16x3(p, p)
        x = bf16x3(x, eye + p)
    return x


def inverse_block_neumann(N: torch.Tensor) -> torch.Tensor:
    """[64, 64] products only: D = the block-diagonal inverse (above), E = D Al with Al the blocks below the
    diagonal (strictly block-lower, E^4 = 0), M = (I + E)^-1 D = D - E D + E (E D) - E^2 (E D)."""
    _, below = _block_masks(N.shape[-1], N.dtype)
    D = _diag_inverse_64(N)
    E = bf16x3(D, N * below)
    E2 = bf16x3(E, E)
    X1 = bf16x3(E, D)
    return fp32(D - X1 + bf16x3(E, X1) - bf16x3(E2, X1))


def inverse_block_rows(N: torch.Tensor) -> torch.Tensor:
    """[64, 64] products only, today's substitution one block row at a time: M_I = -D_I (Al_I M) for row blocks
    I = 1, 2, 3 (two masked [64, 64] products a row block), D from the block-diagonal inverse."""
    _, below = _block_masks(N.shape[-1], N.dtype)
    blk = torch.arange(N.shape[-1]) // 16
    D = _diag_inverse_64(N)
    M = D.clone()
    for i in range(1, 4):
        rows = (blk == i).to(N.dtype)[:, None]
        X = bf16x3(N * below * rows, M)          # rows of block i: sum_L A_iL M_L (M's rows of blocks < i)
        M = M - bf16x3(D, X)                     # D is block-diagonal: only rows of block i change
    return M


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", default="kimi,near0,veryneg,safe")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key-directions", type=int, default=0,
                    help="draw each key near one of this many directions (0: independent keys): P's entries near 1, "
                         "M's entries large, the ill-conditioned case")
    args = ap.parse_args(argv)
    if args.T % BT:
        ap.error(f"--T: expected a multiple of {BT}, got {args.T}")
    torch.manual_seed(args.seed)
    print(f"T {args.T}, HV {args.heads}, K {args.dim}: M's relative error against the float64 inverse, "
          "per chunk-head (median / worst)", flush=True)
    for gate in args.gates.split(","):
        x = make_inputs(1, args.T, args.heads, args.heads, args.dim, args.dim, gate, torch.device("cpu"),
                        dtype=torch.bfloat16)
        k = None
        if args.key_directions:
            dirs = l2norm(torch.randn(args.key_directions, args.dim, dtype=torch.float64))
            pick = torch.randint(args.key_directions, x["k"].shape[:-1])
            k = l2norm(dirs[pick] + 0.05 * torch.randn(*x["k"].shape, dtype=torch.float64))
        qc, kc, _, gc, bc = chunked_inputs(x, k)
        A_kk, _ = chunk_kda_intra(qc, kc, gc, bc, "auto")
        N = fp32(A_kk)  # diag(beta) P as the solve reads it (P in fp32)
        eye = torch.eye(BT, dtype=N.dtype)
        exact = torch.linalg.solve_triangular(eye + N, eye.expand_as(N), upper=False, unitriangular=True)
        cols = [f"{gate}: |M| max {exact.abs().max().item():.1e}"]
        for name, fn in (("blocks (today)", inverse_blocks), ("64-wide block rows", inverse_block_rows),
                         ("64-wide block Neumann", inverse_block_neumann),
                         ("whole-chunk product form", inverse_product_form)):
            err = ((fn(N) - exact).flatten(-2).norm(dim=-1) / exact.flatten(-2).norm(dim=-1)).flatten()
            cols.append(f"{name} {err.median().item():.1e} / {err.max().item():.1e}")
        print("  ".join(cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
