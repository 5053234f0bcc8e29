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
within a chunk, which the unbounded Kimi gate allows. ``intra`` never forms ``exp(-gc)``: it
splits the chunk hierarchically (64 -> 16 -> 4 -> 1) and factors each cross-block entry as
row factor x block-pair factor x column factor, every exponent ``<= 0`` (see
:func:`chunk_kda_intra`). Unused (future) block pairs are masked to ``-inf`` before ``exp``, so
no inf ever meets a zero (no NaN in forward or backward) and future tokens contribute exact
zeros (causality, FLA #1240).
"""

from __future__ import annotations

from itertools import pairwise

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
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, blocks: tuple[int, ...] = (16, 4, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: the intra-chunk matrices, overflow-free for any non-increasing ``gc``.

    Hierarchical anchoring: the chunk (parent) is split into child blocks of ``blocks[0]`` tokens,
    each child again into ``blocks[1]``, ... down to 1. At each level, for a row ``i`` in child
    ``a`` (first token ``r_a``) and a column ``j`` in an earlier child ``b`` (last token ``e_b``)::

        exp(gc_i - gc_j) = exp(gc_i - gc_ra) * exp(gc_ra - gc_eb) * exp(gc_eb - gc_j)

    with every exponent ``<= 0``: a row factor, a small ``[F, F, K]`` child-pair factor and a
    column factor, combined by one batched matmul. Pairs in the same size-1 block are the diagonal.
    Elementwise work stays at about ``(sum of split factors) * BT * K`` per chunk.

    Args:
        q: ``[B, HV, NT, BT, K]`` already multiplied by the scale.
        k: ``[B, HV, NT, BT, K]``.
        gc: ``[B, HV, NT, BT, K]`` from :func:`chunk_kda_cumsum`.
        beta: ``[B, HV, NT, BT]``.
        blocks: decreasing block sizes ending in 1, each dividing the one before (and BT).

    Returns:
        ``A_kk: [B, HV, NT, BT, BT]`` strictly lower (row i scaled by beta_i) and
        ``A_qk: [B, HV, NT, BT, BT]`` lower including the diagonal.
    """
    *lead, BT, K = k.shape
    sizes = [BT] + [b for b in blocks if b < BT]
    if sizes[-1] != 1:
        sizes.append(1)
    for parent, child in pairwise(sizes):
        if parent % child:
            raise ValueError(f"blocks: expected each block size to divide the previous one, got {sizes}")
    dev = k.device
    neg_inf = torch.tensor(float("-inf"), dtype=gc.dtype, device=dev)
    A_qk = (q * k).sum(-1).diag_embed()  # i == j: exp(0) = 1
    A_kk = torch.zeros_like(A_qk)

    for P, C in pairwise(sizes):
        NP, F = BT // P, P // C
        gq = gc.reshape(*lead, NP, F, C, K)
        qq, kk = q.reshape(*lead, NP, F, C, K), k.reshape(*lead, NP, F, C, K)
        g_first, g_last = gq[..., :1, :], gq[..., -1:, :]  # [.., NP, F, 1, K]
        if C > 1:
            row = (gq - g_first).exp()
            qq, kk, k_hat = qq * row, kk * row, kk * (g_last - gq).exp()
        else:
            k_hat = kk
        f = torch.arange(F, device=dev)
        pair_mask = (f[:, None] > f[None, :])[:, :, None]  # [F(a), F(b), 1]: child b before child a
        M = torch.where(pair_mask, g_first.squeeze(-2).unsqueeze(-2) - g_last.squeeze(-2).unsqueeze(-3), neg_inf)
        # [.., NP, F(a), F(b), C, K] -> columns of the parent, per row child a
        Y = (k_hat.unsqueeze(-4) * M.exp().unsqueeze(-2)).reshape(*lead, NP, F, P, K).transpose(-1, -2)
        A_qk = A_qk + _block_diag((qq @ Y).reshape(*lead, NP, P, P))
        A_kk = A_kk + _block_diag((kk @ Y).reshape(*lead, NP, P, P))
    return A_kk * beta.unsqueeze(-1), A_qk


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``[.., NS, BS, BS]`` diagonal blocks -> ``[.., NS*BS, NS*BS]`` block-diagonal matrix."""
    *lead, NS, BS, _ = blocks.shape
    if NS == 1:
        return blocks.reshape(*lead, BS, BS)
    eye = torch.eye(NS, dtype=blocks.dtype, device=blocks.device)
    full = blocks.unsqueeze(-2) * eye[:, None, :, None]  # [.., NS, BS, NS, BS]
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
    # unbind, not u[:, :, n]: each indexing op's backward would allocate a full-size zero gradient.
    for u_n, w_n, d_n, k_n in zip(u.unbind(2), w.unbind(2), decay_last.unbind(2), k_last_t.unbind(2), strict=True):
        hs.append(S)
        vn = u_n - w_n @ S
        vns.append(vn)
        S = d_n * S + k_n @ vn
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
        return _to_chunks(x, BT).contiguous()

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
