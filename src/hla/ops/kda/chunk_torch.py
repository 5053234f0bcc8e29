"""KDA in the chunked WY/UT form, vectorised in PyTorch: the middle rung between the loop and the kernels.

The stages and their names follow the pipeline a Triton kernel runs, so a kernel can be bisected
stage by stage against :func:`chunk_kda_stages`:

1. ``cumsum``     ``gc = cumsum(g)`` inside each chunk (inclusive, float64), the log-decay from the chunk start.
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
within a chunk, which the unbounded Kimi gate allows. ``intra`` anchors every factor at a block
start at or before the row (see :func:`chunk_kda_intra`): cross-block entries use three factors
with exponents ``<= 0``, 16-token diagonal blocks a block-start factorisation while it is in
range, else a full hierarchy down to single tokens. Unused (future) entries are removed with
``where`` (never a 0/1 product that could meet an inf), so no NaN appears in forward or backward
and future tokens contribute exact zeros; anchors never look ahead of the row, so outputs are
bit-exactly causal (the failure mode of FLA #1240).

Underflow. Strong gates push many decay factors below fp32's smallest normal (exp(-87)); subnormal operands
and results run in microcode on x86 (1.3-1.5x slower forward+backward measured here, see
benchmarks/results/kda_cpu.md). In fp32 compute every decay factor below exp(-40) is therefore an exact zero
(see ``_decay``), which changes sums by far less than fp32 rounding; float64 is left exact.
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
    """Stage 1. ``g: [B, HV, NT, BT, K]`` -> inclusive within-chunk cumsum ``gc``, same shape, float64.

    Every later exponent is a difference ``gc_i - gc_j``, whose absolute error is about
    ``eps * |gc|``: in fp32 a strong decay early in a chunk (a "reset", ``|gc|`` ~ 1000) followed by
    slow decay would put ~1e-4 relative error on O(1) terms. float64 makes that negligible for the
    price of a few elementwise passes; every ``exp`` is cast back to the compute dtype.
    """
    return g.to(torch.float64).cumsum(-2)


# Largest exponent the block-start factorisation may meet, per compute dtype: a column factor of at
# most exp(80) ~ 6e34 keeps every used product finite in fp32 (|k| up to ~1e3), and a row factor of
# at least exp(-80) ~ 2e-35 stays above fp32's subnormals (1.2e-38) for |q| >= 1e-3, so every used
# product keeps its relative precision. float64: exp(600) ~ 4e260.
_BLOCKSTART_LIMIT = {torch.float32: 80.0, torch.float64: 600.0}

# Decay factors exp(x), x <= 0, below exp(-_DECAY_FLOOR) are set to exact zeros in fp32 compute. exp(-40) ~ 4e-18 is
# far below fp32's rounding (6e-8) relative to the O(1) terms in the same sums, and it keeps products of two or three
# such factors with q, k, beta and gradients above fp32's smallest normal (1.2e-38). Without the floor, strongly
# decaying gates fill the stages with subnormals, which x86 CPUs process in microcode (each operation ~100x slower).
# float64 compute is left exact.
_DECAY_FLOOR = {torch.float32: 40.0}


def _decay(x: torch.Tensor, dtype: torch.dtype, floor: float | None = None) -> torch.Tensor:
    """``exp(x)`` in ``dtype`` for log-decays ``x <= 0`` (any float dtype; ``-inf`` gives 0), exponents below
    ``-floor`` (default ``_DECAY_FLOOR[dtype]``, none for float64) giving exact zeros instead of subnormals.
    The zeroed entries get zero gradient."""
    floor = _DECAY_FLOOR.get(dtype) if floor is None else floor
    x = x.to(dtype)
    if floor is None:
        return x.exp()
    # where on the exponent, not on exp's result: the subnormal must never be produced (nor its gradient).
    # Written as "x < -floor" so that a NaN exponent stays NaN.
    return torch.where(x < -floor, float("-inf"), x).exp()


def chunk_kda_intra(
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: ``A_kk`` (strictly lower, rows scaled by beta) and ``A_qk`` (lower), ``[.., BT, BT]``.

    Entries between different 16-token blocks use the exact three-factor anchoring of
    :func:`chunk_kda_intra_hierarchical` (its first level). Inside each 16-token diagonal block,
    "auto" factors around the block's first token ``r``: ``exp(gc_i - gc_r) * exp(gc_r - gc_j)``,
    one matmul, exact for row ``i`` while ``max_d (gc_r - gc_i) <= _BLOCKSTART_LIMIT``; rows past
    that (a channel decaying by > 80 within 16 tokens in fp32) are taken from the fully hierarchical result,
    computed only for the (batch, head, chunk) items that have such a row (one host read).
    The choice is made per row from tokens ``<= i`` only, so outputs stay bit-exactly causal.
    "hierarchical" uses :func:`chunk_kda_intra_hierarchical` everywhere.

    Args: q (scaled), k, gc: ``[B, HV, NT, BT, K]``; beta: ``[B, HV, NT, BT]``.
    """
    if method == "hierarchical":
        return chunk_kda_intra_hierarchical(q, k, gc, beta)
    if method != "auto":
        raise ValueError(f"method: expected 'auto' or 'hierarchical', got {method!r}")
    *lead, BT, K = k.shape
    BS = min(16, BT)
    NS = BT // BS
    limit = _BLOCKSTART_LIMIT.get(q.dtype, 80.0)
    if NS > 1:
        A_qk, A_kk = _intra_cross_blocks(q, k, gc, BT, BS)
    else:
        A_qk = A_kk = torch.zeros(*lead, BT, BT, dtype=q.dtype, device=q.device)

    gb = gc.reshape(*lead, NS, BS, K)
    depth = gb[..., :1, :] - gb  # gc_r - gc_i >= 0
    # Rows past the limit are replaced below: their factor may be zeroed, not the used rows' (depth <= limit).
    row = _decay(-depth, q.dtype, floor=limit if q.dtype in _DECAY_FLOOR else None)
    # Clamped so rows past the limit stay finite (they are replaced below, their gradient is zero).
    k_col_t = (k.reshape(*lead, NS, BS, K) * depth.clamp_max(limit).to(k.dtype).exp()).transpose(-1, -2)
    ii = torch.arange(BS, device=gc.device)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    # where, not a product with a 0/1 mask: the unused upper half may be huge.
    Dq = torch.where(ii[:, None] >= ii[None, :], (q.reshape(*lead, NS, BS, K) * row) @ k_col_t, zero)
    Dk = torch.where(ii[:, None] > ii[None, :], (k.reshape(*lead, NS, BS, K) * row) @ k_col_t, zero)
    A_qk = A_qk + _block_diag(Dq)
    A_kk = (A_kk + _block_diag(Dk)) * beta.unsqueeze(-1)

    row_ok = (depth.amax(-1) <= limit).reshape(-1, BT)  # [B * HV * NT, BT]
    bad = (~row_ok).any(-1).nonzero().squeeze(1)
    if bad.numel() == 0:
        return A_kk, A_qk

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[len(lead):])

    hk, hq = chunk_kda_intra_hierarchical(
        flat(q)[bad].unsqueeze(0), flat(k)[bad].unsqueeze(0), flat(gc)[bad].unsqueeze(0),
        flat(beta)[bad].unsqueeze(0),
    )
    keep = row_ok[bad].unsqueeze(-1)  # [n_bad, BT, 1]
    fk, fq = flat(A_kk), flat(A_qk)
    A_kk = fk.index_copy(0, bad, torch.where(keep, fk[bad], hk[0])).reshape(A_kk.shape)
    A_qk = fq.index_copy(0, bad, torch.where(keep, fq[bad], hq[0])).reshape(A_qk.shape)
    return A_kk, A_qk


def _intra_cross_blocks(
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, P: int, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the hierarchy: within each parent of ``P`` tokens, the entries whose column
    lies in an earlier child block of ``C`` tokens. Returns ``A_qk, A_kk`` parts ``[.., BT, BT]``."""
    *lead, BT, K = k.shape
    NP, F = BT // P, P // C
    gq = gc.reshape(*lead, NP, F, C, K)
    qq, kk = q.reshape(*lead, NP, F, C, K), k.reshape(*lead, NP, F, C, K)
    g_first, g_last = gq[..., :1, :], gq[..., -1:, :]  # [.., NP, F, 1, K]
    if C > 1:
        row = _decay(gq - g_first, q.dtype)
        qq, kk, k_hat = qq * row, kk * row, kk * _decay(g_last - gq, k.dtype)
    else:
        k_hat = kk
    f = torch.arange(F, device=gc.device)
    pair_mask = (f[:, None] > f[None, :])[:, :, None]  # [F(a), F(b), 1]: child b before child a
    neg_inf = torch.tensor(float("-inf"), dtype=gc.dtype, device=gc.device)
    M = torch.where(pair_mask, g_first.squeeze(-2).unsqueeze(-2) - g_last.squeeze(-2).unsqueeze(-3), neg_inf)
    # [.., NP, F(a), F(b), C, K] -> columns of the parent, per row child a
    Y = (k_hat.unsqueeze(-4) * _decay(M, k.dtype).unsqueeze(-2)).reshape(*lead, NP, F, P, K).transpose(-1, -2)
    return _block_diag((qq @ Y).reshape(*lead, NP, P, P)), _block_diag((kk @ Y).reshape(*lead, NP, P, P))


def chunk_kda_intra_hierarchical(
    q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, beta: torch.Tensor, blocks: tuple[int, ...] = (16, 4, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2, exact for any non-increasing ``gc`` (no exponent ever positive).

    Hierarchical anchoring: the chunk (parent) is split into child blocks of ``blocks[0]`` tokens,
    each child again into ``blocks[1]``, ... down to 1. At each level, for a row ``i`` in child
    ``a`` (first token ``r_a``) and a column ``j`` in an earlier child ``b`` (last token ``e_b``)::

        exp(gc_i - gc_j) = exp(gc_i - gc_ra) * exp(gc_ra - gc_eb) * exp(gc_eb - gc_j)

    with every exponent ``<= 0``: a row factor, a small ``[F, F, K]`` child-pair factor and a
    column factor, combined by one batched matmul. Pairs in the same size-1 block are the diagonal.
    Every factor depends on tokens ``<= i`` only.

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
    BT = k.shape[-2]
    sizes = [BT] + [b for b in blocks if b < BT]
    if sizes[-1] != 1:
        sizes.append(1)
    for parent, child in pairwise(sizes):
        if parent % child:
            raise ValueError(f"blocks: expected each block size to divide the previous one, got {sizes}")
    A_qk = (q * k).sum(-1).diag_embed()  # i == j: exp(0) = 1
    A_kk = torch.zeros_like(A_qk)
    for P, C in pairwise(sizes):
        dq, dk = _intra_cross_blocks(q, k, gc, P, C)
        A_qk, A_kk = A_qk + dq, A_kk + dk
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
    return Ai @ (b * k * _decay(gc, k.dtype)), Ai @ (b * v)


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
    decay_last = _decay(g_last.squeeze(-2), k.dtype).unsqueeze(-1)  # [B, HV, NT, K, 1]
    k_last_t = (k * _decay(g_last - gc, k.dtype)).transpose(-1, -2)  # [B, HV, NT, K, BT]
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
    return (q * _decay(gc, q.dtype)) @ h + A_qk @ v_new


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
    intra: str = "auto",
) -> dict[str, torch.Tensor]:
    """Run every stage on one batch and return all intermediates (for bisecting a kernel).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay; beta: ``[B, T, HV]``.
        scale: query scale (a float). initial_state: ``[B, HV, K, V]`` or None.
        chunk_size: BT, 64 or 32 (any multiple of 16 works). T is zero-padded to a multiple of BT.
        intra: method of stage 2, see :func:`chunk_kda_intra`.

    Returns:
        dict with ``q, k, v, g, beta`` (chunked, padded, q scaled, in the compute dtype), ``gc`` (float64),
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
    A_kk, A_qk = chunk_kda_intra(qc, kc, gc, bc, intra)
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
    intra: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA forward; differentiable by autograd (no per-token Python loop).

    Inputs are assumed validated (see :func:`hla.ops.kda.kda`).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay; beta: ``[B, T, HV]``.
        scale: query scale. initial_state: ``[N, HV, K, V]`` or None.
        cu_seqlens: ``[N + 1]`` int boundaries of packed sequences (then ``B == 1``), or None.
        chunk_size: BT.
        intra: method of stage 2 ("auto" or "hierarchical"), see :func:`chunk_kda_intra`.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype``; the final state ``[N, HV, K, V]`` in float32 (float64
        for float64 input) if requested, else None.
    """
    if cu_seqlens is not None:
        return _chunk_kda_varlen(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size, intra=intra,
        )
    B, T, H, K = q.shape
    if T == 0:  # nothing to run: the state passes through unchanged
        HV, V = v.shape[2], v.shape[3]
        acc = _acc_dtype(q)
        final = torch.zeros(B, HV, K, V, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
        return v.new_zeros(B, 0, HV, V), (final if output_final_state else None)
    st = chunk_kda_stages(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size, intra=intra
    )
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
    intra: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed sequences as a list of chunks: no chunk spans two sequences, no state crosses a boundary.

    Each sequence is zero-padded to whole chunks (``k = v = q = beta = 0, g = 0``: no write, no
    decay, so its final state is exact) and all chunks run stages 1-4 and 6 together. Stage 5 runs
    on an ``[N, max chunks]`` grid, one row per sequence, short rows filled with an all-zero chunk
    that leaves the state unchanged; work is ``sum(ceil(len / BT))`` chunks plus the grid padding of
    the sequential stage only.
    """
    cu = cu_seqlens.tolist()  # host sync: this path is for prefill/training, not graph capture
    N, BT, dev = len(cu) - 1, chunk_size, q.device
    HV = v.shape[2]
    G = HV // q.shape[2]
    acc = _acc_dtype(q)
    lens = [cu[n + 1] - cu[n] for n in range(N)]
    n_chunks = [-(-length // BT) for length in lens]
    first_chunk = [sum(n_chunks[:n]) for n in range(N)]
    NC = sum(n_chunks)
    # Token t of sequence n goes to padded position (first_chunk[n] * BT + t - cu[n]).
    dest = torch.cat([torch.arange(first_chunk[n] * BT, first_chunk[n] * BT + lens[n], device=dev) for n in range(N)])

    def prep(x: torch.Tensor) -> torch.Tensor:
        x0 = x[0].to(acc)
        if x0.dim() == 2:
            x0 = x0.unsqueeze(-1)
        out = x0.new_zeros((NC * BT,) + tuple(x0.shape[1:])).index_copy(0, dest, x0)
        return _to_chunks(out.unsqueeze(0), BT).contiguous()  # [1, HV, NC, BT, D]

    qc = prep(q.repeat_interleave(G, dim=2) if G > 1 else q) * scale
    kc = prep(k.repeat_interleave(G, dim=2) if G > 1 else k)
    vc, gch, bc = prep(v), prep(g), prep(beta).squeeze(-1)

    gc = chunk_kda_cumsum(gch)
    A_kk, A_qk = chunk_kda_intra(qc, kc, gc, bc, intra)
    Ai = chunk_kda_solve_tril(A_kk)
    w, u = chunk_kda_wu(Ai, kc, vc, gc, bc)

    # Stage 5 on the [N, max_chunks] grid; index NC is an appended all-zero chunk.
    max_nc = max(n_chunks)
    grid = torch.full((N, max_nc), NC, dtype=torch.long)
    for n in range(N):
        grid[n, : n_chunks[n]] = torch.arange(first_chunk[n], first_chunk[n] + n_chunks[n])
    grid = grid.to(dev)

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # [1, HV, NC, ...] -> [N, HV, max_nc, ...]
        x = torch.cat([x, torch.zeros_like(x[:, :, :1])], 2)[0]
        return x.index_select(1, grid.reshape(-1)).unflatten(1, (N, max_nc)).transpose(0, 1)

    h0 = None if initial_state is None else initial_state.to(acc)
    h, v_new, final = chunk_kda_state(to_grid(w), to_grid(u), to_grid(kc), to_grid(gc), h0)
    # Back to the chunk list: real chunk c sits at grid position (n, j), flat index n * max_nc + j.
    pos = torch.cat([torch.arange(n * max_nc, n * max_nc + n_chunks[n]) for n in range(N)]).to(dev)

    def from_grid(x: torch.Tensor) -> torch.Tensor:  # [N, HV, max_nc, ...] -> [1, HV, NC, ...]
        return x.transpose(0, 1).flatten(1, 2).index_select(1, pos).unsqueeze(0)

    o = chunk_kda_output(qc, gc, from_grid(h), A_qk, from_grid(v_new))
    o = _from_chunks(o)[0].index_select(0, dest).unsqueeze(0).to(v.dtype)
    return o, (final if output_final_state else None)
