"""KDA in the chunked WY/UT form, vectorised in PyTorch: the middle rung between the loop and the kernels.

The stages and their names follow the pipeline a Triton kernel runs, so a kernel can be bisected
stage by stage against :func:`chunk_kda_stages`:

1. ``cumsum``     ``gc = cumsum(g)`` inside each chunk (inclusive), the log-decay from the chunk start.
2. ``intra``      ``A_kk[i, j] = beta_i sum_d k_id k_jd exp(gc_id - gc_jd)`` for ``j < i`` and
                  ``A_qk[i, j] = scale sum_d q_id k_jd exp(gc_id - gc_jd)`` for ``j <= i``.
3. ``solve_tril`` ``Ai = (I + A_kk)^-1`` (the UT transform; unit lower triangular).
4. ``wu``         ``w = Ai (beta * k * exp(gc))``, ``u = Ai (beta * v)``.
5. ``state``      over chunks: ``h_n`` = state entering chunk ``n``; ``v_new = u - w h_n``;
                  ``h_{n+1} = exp(gc_last) * h_n + (k * exp(gc_last - gc))^T v_new``.
6. ``output``     ``o = (scale * q * exp(gc)) h_n + A_qk v_new``.

Internal layout: ``[B, HV, NT, BT, D]`` (NT chunks of BT tokens); q/k are expanded to the value
heads first (value head ``j`` reads q/k head ``j // (HV // H)``).

Overflow. ``exp(gc_i - gc_j)`` with ``j <= i`` is at most 1, but the usual factorisation
``(q_i exp(gc_i)) . (k_j exp(-gc_j))`` overflows fp32 once a channel decays by more than ~88
within a chunk, which the unbounded Kimi gate allows. ``intra`` therefore never forms
``exp(-gc)``: the chunk is split into sub-blocks of ``BS`` tokens; for row block ``a`` (first
token ``r``) and columns ``j < r`` the product is factored around the anchor ``r`` as
``exp(gc_i - gc_r) * exp(gc_r - gc_j)``, both factors ``<= 1``; the ``BS x BS`` diagonal blocks
are formed elementwise with the exponent difference inside. Every exponent that is used is
``<= 0``; the unused (future) ones are masked to ``-inf`` before ``exp``, so no inf ever meets a
zero (no NaN in forward or backward) and future tokens contribute exact zeros (causality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_chunks(x: torch.Tensor, BT: int) -> torch.Tensor:
    """``[B, T, HV, D]`` (T a multiple of BT) -> ``[B, HV, NT, BT, D]``."""
    B, T, HV, D = x.shape
    return x.reshape(B, T // BT, BT, HV, D).permute(0, 3, 1, 2, 4)


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    """``[B, HV, NT, BT, D]`` -> ``[B, NT * BT, HV, D]``."""
    B, HV, NT, BT, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, NT * BT, HV, D)


def chunk_kda_cumsum(g: torch.Tensor) -> torch.Tensor:
    """Stage 1. ``g: [B, HV, NT, BT, K]`` -> inclusive within-chunk cumsum ``gc``, same shape."""
    return g.cumsum(-2)


def chunk_kda_intra(
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, block: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: the intra-chunk matrices, overflow-free for any ``gc`` that is non-increasing.

    Args:
        q: ``[B, HV, NT, BT, K]`` already multiplied by the scale.
        k: ``[B, HV, NT, BT, K]``.
        gc: ``[B, HV, NT, BT, K]`` from :func:`chunk_kda_cumsum`.
        beta: ``[B, HV, NT, BT]``.
        block: sub-block size ``BS`` (divides BT) for the anchored factorisation.

    Returns:
        ``A_kk: [B, HV, NT, BT, BT]`` strictly lower (rows scaled by beta) and
        ``A_qk: [B, HV, NT, BT, BT]`` lower including the diagonal.
    """
    *lead, BT, K = k.shape
    BS = min(block, BT)
    if BT % BS:
        raise ValueError(f"block: expected a divisor of the chunk size {BT}, got {block}")
    NS = BT // BS
    dev = k.device
    neg_inf = torch.tensor(float("-inf"), dtype=gc.dtype, device=dev)
    pos = torch.arange(BT, device=dev)

    # Off-diagonal blocks: row block a is anchored at its first token r_a = a * BS.
    g_anchor = gc[..., ::BS, :]  # [.., NS, K]
    gq = gc.reshape(*lead, NS, BS, K) - g_anchor.unsqueeze(-2)  # gc_i - gc_r <= 0
    decay_rows = gq.exp()
    q_rows = q.reshape(*lead, NS, BS, K) * decay_rows  # [.., NS, BS, K]
    k_rows = k.reshape(*lead, NS, BS, K) * decay_rows
    earlier = pos[None, :] < (pos[::BS])[:, None]  # [NS, BT]: column j lies before anchor r_a
    gk = torch.where(earlier[:, :, None], g_anchor.unsqueeze(-2) - gc.unsqueeze(-3), neg_inf)
    k_cols = k.unsqueeze(-3) * gk.exp()  # [.., NS, BT, K], zero for j >= r_a
    k_cols_t = k_cols.transpose(-1, -2)
    A_qk = (q_rows @ k_cols_t).reshape(*lead, BT, BT)
    A_kk = (k_rows @ k_cols_t).reshape(*lead, BT, BT)

    # Diagonal BS x BS blocks, exponent difference inside, masked before exp.
    ii = torch.arange(BS, device=dev)
    causal = ii[:, None] >= ii[None, :]  # [BS, BS]
    gb = gc.reshape(*lead, NS, BS, K)
    diff = torch.where(causal[:, :, None], gb.unsqueeze(-2) - gb.unsqueeze(-3), neg_inf)
    kd = k.reshape(*lead, NS, 1, BS, K) * diff.exp()  # [.., NS, BS(i), BS(j), K]
    qb = q.reshape(*lead, NS, BS, 1, K)
    kb = k.reshape(*lead, NS, BS, 1, K)
    # (x_i . kd_ij) as a batched matvec over K: [.., NS, BS, 1, K] @ [.., NS, BS, K, BS]
    Dq = (qb @ kd.transpose(-1, -2)).squeeze(-2)  # [.., NS, BS, BS]
    Dk = (kb @ kd.transpose(-1, -2)).squeeze(-2)
    strict = ~torch.eye(BS, dtype=torch.bool, device=dev)
    Dk = Dk * strict

    eye_blocks = torch.eye(NS, dtype=gc.dtype, device=dev)
    A_qk = A_qk + _block_diag(Dq, eye_blocks)
    A_kk = (A_kk + _block_diag(Dk, eye_blocks)) * beta.unsqueeze(-1)
    return A_kk, A_qk


def _block_diag(blocks: torch.Tensor, eye_blocks: torch.Tensor) -> torch.Tensor:
    """``[.., NS, BS, BS]`` diagonal blocks -> ``[.., NS*BS, NS*BS]`` block-diagonal matrix."""
    *lead, NS, BS, _ = blocks.shape
    full = blocks.unsqueeze(-2) * eye_blocks[:, None, :, None]  # [.., NS, BS, NS, BS, BS]
    return full.reshape(*lead, NS * BS, NS * BS)


def chunk_kda_solve_tril(A_kk: torch.Tensor) -> torch.Tensor:
    """Stage 3. ``Ai = (I + A_kk)^-1``, ``A_kk: [.., BT, BT]`` strictly lower -> unit lower ``Ai``."""
    BT = A_kk.shape[-1]
    eye = torch.eye(BT, dtype=A_kk.dtype, device=A_kk.device)
    return torch.linalg.solve_triangular(A_kk + eye, eye.expand_as(A_kk), upper=False, unitriangular=True)


def chunk_kda_wu(
    Ai: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 4. ``w = Ai (beta k exp(gc))``: ``[.., BT, K]``; ``u = Ai (beta v)``: ``[.., BT, V]``."""
    b = beta.unsqueeze(-1)
    return Ai @ (b * k * gc.exp()), Ai @ (b * v)


def chunk_kda_state(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    gc: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 5, the only sequential part: a Python loop over chunks, vectorised over everything else.

    Args:
        w: ``[B, HV, NT, BT, K]``, u: ``[B, HV, NT, BT, V]``, k and gc: ``[B, HV, NT, BT, K]``.
        initial_state: ``[B, HV, K, V]`` in the compute dtype, or None for zeros.

    Returns:
        ``h: [B, HV, NT, K, V]`` (state entering each chunk), ``v_new: [B, HV, NT, BT, V]`` and the
        state after the last chunk ``[B, HV, K, V]``.
    """
    B, HV, NT, BT, K = k.shape
    V = u.shape[-1]
    g_last = gc[..., -1:, :]  # [B, HV, NT, 1, K]
    decay_last = g_last.squeeze(-2).exp().unsqueeze(-1)  # [B, HV, NT, K, 1]
    k_last_t = (k * (g_last - gc).exp()).transpose(-1, -2)  # [B, HV, NT, K, BT]
    if initial_state is None:
        S = torch.zeros(B, HV, K, V, dtype=k.dtype, device=k.device)
    else:
        S = initial_state
    hs, vns = [], []
    for n in range(NT):
        hs.append(S)
        vn = u[:, :, n] - w[:, :, n] @ S
        vns.append(vn)
        S = decay_last[:, :, n] * S + k_last_t[:, :, n] @ vn
    return torch.stack(hs, 2), torch.stack(vns, 2), S


def chunk_kda_output(
    q: torch.Tensor, gc: torch.Tensor, h: torch.Tensor, A_qk: torch.Tensor, v_new: torch.Tensor
) -> torch.Tensor:
    """Stage 6. ``o = (q exp(gc)) h + A_qk v_new``: ``[B, HV, NT, BT, V]`` (q already scaled)."""
    return (q * gc.exp()) @ h + A_qk @ v_new


def chunk_kda_stages(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Run every stage on one batch and return all intermediates (for bisecting a kernel).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay; beta: ``[B, T, HV]``.
        scale: query scale (a float). initial_state: ``[B, HV, K, V]`` or None.
        chunk_size: BT, 64 or 32 (any multiple of 16 works). T is zero-padded to a multiple of BT.

    Returns:
        dict with ``q, k, v, g, beta`` (chunked, padded, q scaled, in the compute dtype), ``gc``,
        ``A_kk``, ``A_qk``, ``Ai``, ``w``, ``u``, ``h``, ``v_new``, ``o`` (all ``[B, HV, NT, BT, ...]``)
        and ``final_state: [B, HV, K, V]``. The compute dtype is float64 for float64 input, else float32.
    """
    B, T, H, K = q.shape
    HV = v.shape[2]
    G = HV // H
    BT = chunk_size
    acc = _acc_dtype(q)
    pad = (-T) % BT

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(acc)
        if x.dim() == 3:
            x = x.unsqueeze(-1)
        if pad:
            # Zero k, v, q, beta and g = 0 on the padding: no write, no decay, so the state is exact.
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return _to_chunks(x, BT)

    qc = prep(q.repeat_interleave(G, dim=2) if G > 1 else q) * scale
    kc = prep(k.repeat_interleave(G, dim=2) if G > 1 else k)
    vc, gch, bc = prep(v), prep(g), prep(beta).squeeze(-1)
    h0 = None if initial_state is None else initial_state.to(acc)

    gc = chunk_kda_cumsum(gch)
    A_kk, A_qk = chunk_kda_intra(qc, kc, gc, bc)
    Ai = chunk_kda_solve_tril(A_kk)
    w, u = chunk_kda_wu(Ai, kc, vc, gc, bc)
    h, v_new, final = chunk_kda_state(w, u, kc, gc, h0)
    o = chunk_kda_output(qc, gc, h, A_qk, v_new)
    return dict(
        q=qc, k=kc, v=vc, g=gch, beta=bc, gc=gc, A_kk=A_kk, A_qk=A_qk, Ai=Ai, w=w, u=u, h=h,
        v_new=v_new, o=o, final_state=final,
    )


def chunk_kda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA forward; differentiable by autograd (no per-token Python loop).

    Inputs are assumed validated (see :func:`hla.ops.kda.kda`).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay; beta: ``[B, T, HV]``.
        scale: query scale. initial_state: ``[N, HV, K, V]`` or None.
        cu_seqlens: ``[N + 1]`` int boundaries of packed sequences (then ``B == 1``), or None.
        chunk_size: BT.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype``; the final state ``[N, HV, K, V]`` in float32 (float64
        for float64 input) if requested, else None.
    """
    if cu_seqlens is not None:
        return _chunk_kda_varlen(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    T = q.shape[1]
    st = chunk_kda_stages(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    o = _from_chunks(st["o"])[:, :T].to(v.dtype)
    return o, (st["final_state"] if output_final_state else None)


def _chunk_kda_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed sequences: scatter each into its own zero-padded row of a ``[N, L, ...]`` batch.

    Padding is ``k = v = q = beta = 0, g = 0`` (no write, no decay), so each row's final state is
    its sequence's and nothing crosses a boundary. Cost is ``N * max_len`` tokens; very uneven
    lengths waste work (acceptable for the CPU path; the kernels index chunks directly).
    """
    cu = cu_seqlens.tolist()  # host sync: this path is for prefill/training, not graph capture
    N = len(cu) - 1
    T = q.shape[1]
    lens = [cu[n + 1] - cu[n] for n in range(N)]
    BT = chunk_size
    L = max(1, max(lens) if lens else 1)
    L = -(-L // BT) * BT
    dev = q.device
    # Token t of sequence n goes to flat row n * L + (t - cu[n]).
    dest = torch.cat([torch.arange(n * L, n * L + lens[n], device=dev) for n in range(N)])

    def scatter(x: torch.Tensor) -> torch.Tensor:
        x0 = x[0]  # [T, ...]
        out = x0.new_zeros((N * L,) + tuple(x0.shape[1:]))
        out = out.index_copy(0, dest, x0)
        return out.reshape((N, L) + tuple(x0.shape[1:]))

    o_pad, final = chunk_kda_torch(
        scatter(q), scatter(k), scatter(v), scatter(g), scatter(beta), scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size,
    )
    o = o_pad.reshape((N * L,) + tuple(o_pad.shape[2:])).index_select(0, dest).reshape((1, T) + tuple(o_pad.shape[2:]))
    return o, final
