"""Self-check of the KDA paths against each other (used by ``hla demo`` and the tests).

``run_selfcheck()`` runs the reference loop, the chunked torch path (whole and varlen) and the
decode step on the same random inputs and returns one row per comparison with its relative
error ``||out - ref|| / ||ref||`` and the tolerance it must meet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hla.ops.kda.api import kda, kda_decode
from hla.ops.kda.gate import kda_gate, l2norm


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``ref`` must not be all zeros)."""
    ref64 = ref.detach().double()
    return float((out.detach().to(ref64.device, torch.float64) - ref64).norm() / ref64.norm())


def random_kda_inputs(
    B: int = 1,
    T: int = 64,
    H: int = 2,
    HV: int | None = None,
    K: int = 16,
    V: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    gate_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Random but realistic KDA inputs: unit-norm q/k, Kimi-gate decays at the Kimi init, beta in (0, 1).

    Returns a dict ``q [B,T,H,K], k, v [B,T,HV,V], g [B,T,HV,K] (float32, or float64), beta [B,T,HV]``,
    ``g`` multiplied by ``gate_scale`` (use large values to test strong decay).
    """
    HV = H if HV is None else HV
    V = K if V is None else V

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    # The Kimi/FLA initialisation (spec section 2): A = U(1, 16), dt = logU(1e-3, 1e-1), dt_bias =
    # softplus^-1(dt); the raw gate projection ~ N(0, 1).
    A_log = torch.rand(HV, generator=generator, dtype=torch.float64).mul(15).add(1).log().to(device)
    u = torch.rand(HV * K, generator=generator, dtype=torch.float64).to(device)
    dt = torch.exp(u * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    g = kda_gate(rnd(B, T, HV, K), A_log, dt_bias) * gate_scale
    beta = torch.rand(B, T, HV, generator=generator, dtype=torch.float64).to(device)
    return dict(
        q=l2norm(rnd(B, T, H, K)).to(dtype),
        k=l2norm(rnd(B, T, H, K)).to(dtype),
        v=rnd(B, T, HV, V).to(dtype),
        g=g.to(gdtype),
        beta=beta.to(dtype),
    )


@dataclass
class CheckRow:
    """One comparison: ``name`` of the path and tensor, its relative error and tolerance."""

    name: str
    dtype: str
    rel_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tol


def run_selfcheck(
    device: str | torch.device = "cpu",
    seed: int = 0,
    backend: str = "torch",
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
) -> list[CheckRow]:
    """Compare chunked, varlen and decode paths of ``backend`` with the reference loop.

    The reference always runs in float64 on the CPU; the checked path runs on ``device`` in each of
    ``dtypes`` (tolerance 1e-10 for float64, 1e-5 for float32, 5e-3 for 16-bit types).
    """
    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K, V = 2, 100, 2, 4, 32, 16
    base = random_kda_inputs(B, T, H, HV, K, V, dtype=torch.float64, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen, dtype=torch.float64) * 0.1
    ref_o, ref_s = kda(**base, initial_state=h0, output_final_state=True, backend="reference")
    tols = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}
    cu = torch.tensor([0, 37, 100, 160, 200])
    packed = {n: x.reshape(1, B * T, *x.shape[2:]) for n, x in base.items()}
    h0p = torch.randn(4, HV, K, V, generator=gen, dtype=torch.float64) * 0.1
    refp_o, refp_s = kda(**packed, initial_state=h0p, output_final_state=True, cu_seqlens=cu, backend="reference")

    rows = []
    for dtype in dtypes:
        tol = tols[dtype]
        name = str(dtype).replace("torch.", "")
        g_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32  # gates stay fp32
        x = {n: t.to(device=device, dtype=g_dtype if n == "g" else dtype) for n, t in base.items()}
        xp = {n: t.to(device=device, dtype=g_dtype if n == "g" else dtype) for n, t in packed.items()}
        r_o, r_s, rp_o, rp_s = ref_o, ref_s, refp_o, refp_s
        if dtype in (torch.bfloat16, torch.float16):
            # Reference on the same rounded inputs: this checks the path, not the input rounding.
            r_o, r_s = kda(**{n: t.cpu().double() for n, t in x.items()}, initial_state=h0,
                           output_final_state=True, backend="reference")
            rp_o, rp_s = kda(**{n: t.cpu().double() for n, t in xp.items()}, initial_state=h0p,
                             output_final_state=True, cu_seqlens=cu, backend="reference")
        o, s = kda(**x, initial_state=h0.to(device, g_dtype), output_final_state=True, backend=backend)
        rows.append(CheckRow(f"{backend} chunked o", name, rel_error(o, r_o), tol))
        rows.append(CheckRow(f"{backend} chunked final state", name, rel_error(s, r_s), tol))

        o, s = kda(**xp, initial_state=h0p.to(device, g_dtype), output_final_state=True,
                   cu_seqlens=cu.to(device), backend=backend)
        rows.append(CheckRow(f"{backend} varlen o (4 seqs)", name, rel_error(o, rp_o), tol))
        rows.append(CheckRow(f"{backend} varlen final states", name, rel_error(s, rp_s), tol))

        # decode: the pool holds the states at slots 3 and 1 of 5; one token per call.
        pool = torch.zeros(5, HV, K, V, dtype=g_dtype if g_dtype == torch.float64 else torch.float32, device=device)
        idx = torch.tensor([3, 1], device=device)
        pool[idx] = h0.to(device, pool.dtype)
        outs = [kda_decode(**{n: t[:, i : i + 1] for n, t in x.items()}, state=pool, state_indices=idx,
                           backend=backend) for i in range(T)]
        rows.append(CheckRow(f"{backend} decode o (token by token)", name, rel_error(torch.cat(outs, 1), r_o), tol))
        rows.append(CheckRow(f"{backend} decode state pool", name, rel_error(pool[idx], r_s), tol))
    return rows


def time_paths(T: int = 512, H: int = 4, K: int = 64, seed: int = 0) -> list[tuple[str, float, float]]:
    """CPU forward times of the reference and the chunked path at one small size, float32.

    Returns ``[(path, seconds, speedup vs reference)]``; one run each (the chunked path warmed up).
    """
    gen = torch.Generator().manual_seed(seed)
    x = random_kda_inputs(1, T, H, H, K, K, dtype=torch.float32, generator=gen)
    times = {}
    with torch.no_grad():
        kda(**x, backend="torch")  # warm-up (the reference loop needs none)
        for backend in ("reference", "torch"):
            t0 = time.perf_counter()
            kda(**x, backend=backend)
            times[backend] = time.perf_counter() - t0
    return [(b, t, times["reference"] / t) for b, t in times.items()]
