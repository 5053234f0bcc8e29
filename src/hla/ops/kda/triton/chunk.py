"""Chunked KDA in Triton: host side, launch order and the autograd wiring.

Forward, four launches: the intra-chunk stage (intra.py: a fast pass with the gate, l2norm and beta
fused, an exact pass only for the key blocks it flagged, and the solve, which folds M diag(beta) into the
walk's kd and A_qk: PREMULTIPLY), then the recurrence that also writes the output (recurrence.py).
A forward whose outputs need no gradient takes launches chosen for the forward alone: the Gluon fast intra launch
(intra.INTRA_WGMMA) and, where the walk's grid leaves half the SMs free, the walk beside the solve (BESIDE_SOLVE).
Saved for the backward: the inputs and stage 1's per-chunk matrices A_qk, P and M (three [64, 64]
tiles per chunk and value head, P and M in fp32, A_qk in bf16 for bf16 inputs: 640 bytes per token
and head, about 0.6x the bf16 q, k, v, g at K = V = 128; 768 with an fp32 A_qk), the part of stage 1
that costs tensor-core pair products, the exact launch and the inverse. The backward recomputes the per-token
tensors of stage 1 (qg, kd, w, u and, for the intra backward, Gamma in fp32 and the rows' inverse
norms: larger than the matrices, cheap to form), re-runs the recurrence storing each chunk's entry
state and v_new, walks the chunks in reverse for the state gradients and forms the per-chunk
products (recurrence_bwd.py), then differentiates stage 1 (intra_bwd.py). No torch autograd inside.
"""

from __future__ import annotations

import functools

import torch

from hla.ops.device import sm_count
from hla.ops.kda.triton.common import MAX_GRID_Y
from hla.ops.kda.triton.intra import kda_intra_fwd
from hla.ops.kda.triton.intra_bwd import kda_intra_bwd
from hla.ops.kda.triton.recurrence import _use_wgmma_walk, kda_recurrence_fwd
from hla.ops.kda.triton.recurrence_bwd import kda_state_grad
from hla.ops.kda.triton.recurrence_wgmma import walk_programs


def _build_equal_length_bounds(B: int, T: int, BT: int, device: torch.device):
    """chunk_bounds ``[NC, 2]``, chunk_offsets ``[B + 1]`` and cu ``[B + 1]`` (int32) of B sequences of T
    tokens, built with device ops (no host round trip, CUDA-graph capturable)."""
    nt = -(-T // BT)
    starts = torch.arange(nt, device=device, dtype=torch.int32) * BT
    s = (torch.arange(B, device=device, dtype=torch.int32)[:, None] * T + starts[None, :]).reshape(-1)
    e = torch.minimum(s + BT, (s // T + 1) * T) if T > 0 else s
    bounds = torch.stack([s, e], 1) if B * nt else torch.zeros(1, 2, dtype=torch.int32, device=device)
    return (bounds, torch.arange(B + 1, device=device, dtype=torch.int32) * nt,
            torch.arange(B + 1, device=device, dtype=torch.int32) * T)


@functools.lru_cache(maxsize=64)
def _cached_equal_length_bounds(B: int, T: int, BT: int, device: torch.device):
    # built on the CPU and copied with a blocking copy: complete before any stream reads them
    return tuple(t.to(device) for t in _build_equal_length_bounds(B, T, BT, torch.device("cpu")))


def _equal_length_bounds(B: int, T: int, BT: int, device: torch.device):
    """The bounds of B sequences of T tokens, cached per (B, T, BT, device): building them took about fifteen
    tiny launches, 3% of a B1 T8192 H32 forward (H200, session 10: 0.924 -> 0.895 ms, two runs); nothing
    writes to them. Inside a CUDA-graph capture they are built by captured launches and not cached (the
    graph fills them only when it replays)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _build_equal_length_bounds(B, T, BT, device)
    return _cached_equal_length_bounds(B, T, BT, device)


class _ChunkMeta:
    """Chunk boundaries of a (possibly packed) batch, in flattened token indices."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int, device: torch.device):
        self.TT = B * T
        self.BT = BT
        if cu_seqlens is None:
            self.N, self.NC = B, B * -(-T // BT)
            self.chunk_bounds, self.chunk_offsets, self.cu = _equal_length_bounds(B, T, BT, device)
            return
        cu = [int(x) for x in cu_seqlens.tolist()]
        bounds, offsets = [], [0]
        for n in range(len(cu) - 1):
            for s in range(cu[n], cu[n + 1], BT):
                bounds.append((s, min(s + BT, cu[n + 1])))
            offsets.append(len(bounds))
        self.N = len(cu) - 1
        self.NC = len(bounds)
        self.chunk_bounds = torch.tensor(bounds or [(0, 0)], dtype=torch.int32, device=device).reshape(-1, 2)
        self.chunk_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)


def _intra_kwargs(opts: dict, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None) -> dict:
    """The stage-1 options, as the forward and the backward's recompute both pass them."""
    return dict(scale=opts["scale"], A_log=A_log, dt_bias=dt_bias, lower_bound=opts["lower_bound"],
                use_qk_l2norm=opts["use_qk_l2norm"], use_beta_sigmoid=opts["use_beta_sigmoid"])


# The forward's output walk over the premultiplied operands (intra.kda_intra_fwd's premultiply): the solve writes
# (M diag(beta))^T kd and A_qk M diag(beta) instead of w and an fp32 u, and the walk reads v instead of u. False: the
# walk over w, u as the backward's states walk still takes them.
PREMULTIPLY = True
# A forward that feeds no backward, whose output walk fills at most half the SMs, runs its walk beside the solve: the
# walk is launched on the side stream once the launches before the solve are done, and waits chunk by chunk for the
# per-chunk flags the solve sets as it stores each chunk-head's kd and AqkM (its grid then runs chunk by chunk across
# heads). The solve never waits, and the walk's programs leave at least half the SMs to it, so this cannot deadlock.
# H200, forward ms: B1 T8192 H32 0.739 -> 0.683 (bounded gate), 0.775 -> 0.725 (Kimi); T32K 2.883 -> 2.688, 2.932 ->
# 2.736 (session 19). The walk's 107 KB two-programs-per-SM form (room for two solve programs beside it on its SMs)
# was slower: 0.800 at B1. Session 20: with the flags read an iteration ahead (recurrence_wgmma), B1 0.637 / 0.688 ms
# (bounded / Kimi), T32K 2.437 / 2.513. A head start for the solve (its first chunks before the walk starts) and one
# solve program beside each walk program (2 stages, the largest carveout) were both slower (kda_notes.md).
BESIDE_SOLVE = True


@functools.lru_cache(maxsize=4)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device, priority=torch.cuda.Stream.priority_range()[1])


def _walk_beside_solve(meta: _ChunkMeta, HV: int, V: int, x: torch.Tensor, opts: dict) -> bool:
    return (BESIDE_SOLVE and not opts["needs_grad"] and PREMULTIPLY and x.device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing()
            and walk_programs(meta.N, HV, V) <= sm_count(x.device) // 2 and meta.NC <= MAX_GRID_Y)


def _forward_beside_solve(flat, meta: _ChunkMeta, h0, opts: dict, A_log, dt_bias):
    """The inference forward with its walk beside the solve (BESIDE_SOLVE): o [TT, HV, V] and the final state. Where
    the Gluon output walk does not run these tensors (not Hopper, fp16 / fp32 inputs), the walk after the solve."""
    q, k, v, g, beta = flat
    TT, HV, V = v.shape
    o = torch.empty(TT, HV, V, device=q.device, dtype=v.dtype)
    walk = dict(initial_state=h0, output_final_state=opts["output_final_state"], out_dtype=v.dtype,
                premultiplied=True, out=o)
    walked = {}

    def solve_and_walk(st: dict, issue_solve) -> None:
        st = dict(st, Aqk=st["AqkM"])
        if not _use_wgmma_walk(st, True, False, True, (None,), out_dtype=v.dtype, premultiplied=True):
            issue_solve(None)
            walked["ht"] = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, **walk)[1]
            return
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        ready = torch.zeros(meta.NC, HV, device=q.device, dtype=torch.int32)
        issued = torch.cuda.Event()
        issued.record(main)  # the fast and exact launches, and the zeroed flags
        issue_solve(ready)  # first: see kda_intra_fwd's beside_solve
        with torch.cuda.stream(side):
            side.wait_event(issued)
            walked["ht"] = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, **walk, ready=ready)[1]
        # the caller's stream waits for the walk before anything the walk reads (ready, st, h0) can be freed into it
        main.wait_stream(side)
        if walked["ht"] is not None:
            walked["ht"].record_stream(main)  # allocated on the side stream, handed to the caller's

    kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, chunk_size=meta.BT, **_intra_kwargs(opts, A_log, dt_bias),
                  premultiply=True, for_backward=False, beside_solve=solve_and_walk)
    return o, walked["ht"]


class KDAChunkTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
        B, T, H, K = q.shape
        HV, V = v.shape[-2], v.shape[-1]
        meta = _ChunkMeta(B, T, opts["cu_seqlens"], opts["chunk_size"], q.device)
        if meta.NC == 0:  # no tokens: nothing to launch, the state passes through
            ctx.mark_non_differentiable()
            ht = None
            if opts["output_final_state"]:
                ht = (initial_state.clone() if initial_state is not None
                      else q.new_zeros(meta.N, HV, K, V, dtype=torch.float32))
            return v.new_empty(B, T, HV, V), ht
        flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta)]
        h0 = initial_state.contiguous() if initial_state is not None else None
        if _walk_beside_solve(meta, HV, V, q, opts):  # a forward that feeds no backward: nothing is saved
            o, ht = _forward_beside_solve(flat, meta, h0, opts, A_log, dt_bias)
            return o.view(B, T, HV, V), ht
        st = kda_intra_fwd(*flat, meta.chunk_bounds, chunk_size=meta.BT, **_intra_kwargs(opts, A_log, dt_bias),
                           premultiply=PREMULTIPLY, for_backward=opts["needs_grad"])
        o, ht, _, _ = kda_recurrence_fwd(dict(st, Aqk=st["AqkM"]) if PREMULTIPLY else st, meta.cu,
                                         meta.chunk_offsets, initial_state=h0,
                                         output_final_state=opts["output_final_state"], out_dtype=v.dtype,
                                         premultiplied=PREMULTIPLY)
        ctx.save_for_backward(*flat, A_log, dt_bias, h0, st["Aqk"], st["P"], st["M"])
        ctx.meta, ctx.opts, ctx.shape = meta, opts, (B, T, H, K, HV, V)
        return o.view(B, T, HV, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, A_log, dt_bias, h0, Aqk, P, M = ctx.saved_tensors
        meta, opts = ctx.meta, ctx.opts
        B, T, H, K, HV, V = ctx.shape
        TT = meta.TT
        kw = _intra_kwargs(opts, A_log, dt_bias)
        # Recompute stage 1's per-token tensors and the states (h at each chunk's entry, v_new).
        st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, chunk_size=meta.BT, **kw,
                           saved=dict(Aqk=Aqk, P=P, M=M), store_gamma=True)
        _, _, h, vnew = kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=h0,
                                           output_final_state=False, out_dtype=v.dtype, store_h=True, write_o=False)
        gr = kda_state_grad(st, h, vnew, do.reshape(TT, HV, V), dht, meta.cu, meta.chunk_offsets,
                            meta.chunk_bounds, need_dh0=h0 is not None)
        del h, vnew
        d = kda_intra_bwd(q, k, v, g, beta, meta.chunk_bounds, st, gr, **kw)
        # dq, dk, dv, dg come in their inputs' dtypes (kda_intra_bwd writes them so); dbeta is fp32
        dq = d["dq"].view(B, T, H, K)
        dk = d["dk"].view(B, T, H, K)
        dv = d["dv"].view(B, T, HV, V)
        dg = d["dg"].view(B, T, HV, K)
        dbeta = d["dbeta"].view(B, T, HV).to(beta.dtype)
        return dq, dk, dv, dg, dbeta, d["dA_log"], d["ddt_bias"], gr["dh0"], None


def kda_chunk_triton(
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
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_qk_l2norm: bool = False,
    use_beta_sigmoid: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA forward (differentiable) on CUDA tensors (or the Triton interpreter).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log-decay, or the raw gate
            when ``A_log`` is given; beta: ``[B, T, HV]`` (logits if ``use_beta_sigmoid``).
        initial_state: ``[N, HV, K, V]`` float32; N = B, or the number of packed sequences.
        cu_seqlens: ``[N + 1]`` packed-sequence boundaries (then B == 1).
        chunk_size: 64 (the kernels are laid out for four 16-row blocks).

    Returns:
        ``o: [B, T, HV, V]`` in v.dtype and the final state ``[N, HV, K, V]`` float32 (or None).
    """
    if chunk_size != 64:
        raise ValueError(f"chunk_size: the triton backend supports 64, got {chunk_size}")
    if initial_state is not None and initial_state.dtype != torch.float32:
        initial_state = initial_state.float()
    # a forward whose outputs need no gradient (inference, torch.no_grad) may take launches chosen for the forward
    # alone (intra.INTRA_WGMMA): nothing it computes feeds a backward
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, A_log, dt_bias, initial_state))
    opts = dict(scale=float(scale), output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                lower_bound=lower_bound, use_qk_l2norm=use_qk_l2norm, use_beta_sigmoid=use_beta_sigmoid,
                chunk_size=chunk_size, needs_grad=needs_grad)
    A_log_f = A_log.reshape(-1).float() if A_log is not None else None
    dt_f = dt_bias.reshape(-1).float() if dt_bias is not None else None
    o, ht = KDAChunkTriton.apply(q, k, v, g, beta, A_log_f, dt_f, initial_state, opts)
    return o, ht
