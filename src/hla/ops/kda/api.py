"""The public KDA entry points: validation, the optional raw-projection preprocessing, dispatch.

``kda`` runs a whole sequence (prefill / training), ``kda_decode`` a few tokens against a state
pool updated in place. Backends: "reference" (the token loop), "torch" (chunked WY/UT form on any
device), "triton" (the kernels in ``hla.ops.kda.triton``, imported lazily) and "auto" (triton for
CUDA tensors when that module imports, else torch).
"""

from __future__ import annotations

import torch

from hla.ops.kda.chunk_torch import chunk_kda_torch
from hla.ops.kda.decode_torch import kda_decode_torch
from hla.ops.kda.gate import kda_gate, l2norm
from hla.ops.kda.reference import kda_reference

BACKENDS = ("auto", "reference", "torch", "triton")
MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, backend: str
) -> tuple[int, int, int, int, int, int]:
    """Shapes, dtypes and devices shared by ``kda`` and ``kda_decode``. Returns ``B, T, H, HV, K, V``."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    for name, x, rank, layout in (
        ("q", q, 4, "[B, T, H, K]"),
        ("k", k, 4, "[B, T, H, K]"),
        ("v", v, 4, "[B, T, HV, V]"),
        ("g", g, 4, "[B, T, HV, K]"),
        ("beta", beta, 3, "[B, T, HV]"),
    ):
        if x.dim() != rank:
            raise ValueError(f"{name}: expected {rank} dims {layout}, got shape {_shape(x)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {_shape(q)} [B, T, H, K], got {_shape(k)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v: expected [B, T] = {(B, T)} leading dims like q, got shape {_shape(v)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"v: expected value heads HV a multiple of the q/k heads H = {H}, got HV = {HV}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"q/v: expected head dims K, V <= {MAX_HEAD_DIM}, got K = {K}, V = {V}")
    if K < 1 or V < 1 or H < 1:
        raise ValueError(f"q/v: expected non-empty heads, got q {_shape(q)} and v {_shape(v)}")
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g: expected [B, T, HV, K] = {(B, T, HV, K)}, got {_shape(g)}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta: expected [B, T, HV] = {(B, T, HV)}, got {_shape(beta)}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return B, T, H, HV, K, V


def _check_gate_args(
    HV: int, K: int, device: torch.device, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
    lower_bound: float | None,
) -> None:
    if A_log is None:
        if dt_bias is not None:
            raise ValueError("dt_bias: expected None unless A_log is given (g is then the raw gate), got a tensor")
        if lower_bound is not None:
            raise ValueError(f"lower_bound: expected None unless A_log is given, got {lower_bound}")
        return
    _check_float("A_log", A_log)
    if A_log.numel() != HV:
        raise ValueError(f"A_log: expected {HV} elements (one per value head), got shape {_shape(A_log)}")
    if A_log.device != device:
        raise ValueError(f"A_log: expected device {device}, got {A_log.device}")
    if dt_bias is not None:
        _check_float("dt_bias", dt_bias)
        if dt_bias.numel() != HV * K:
            raise ValueError(f"dt_bias: expected {HV * K} elements (HV*K), got shape {_shape(dt_bias)}")
        if dt_bias.device != device:
            raise ValueError(f"dt_bias: expected device {device}, got {dt_bias.device}")
    if lower_bound is not None and not (isinstance(lower_bound, (int, float)) and lower_bound < 0):
        raise ValueError(f"lower_bound: expected a negative float or None, got {lower_bound!r}")


def _check_scale(scale: float | None, K: int) -> float:
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return float(scale)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, device: torch.device) -> int:
    """Returns N. Reads the boundaries on the host: varlen prefill is not a graph-captured path."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        got = _shape(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor [N + 1], got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., T], got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected device {device}, got {cu_seqlens.device}")
    if B != 1:
        raise ValueError(f"q: expected batch size B = 1 with cu_seqlens (packed sequences), got B = {B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] = T = {T}, got {cu[-1]}")
    for n in range(len(cu) - 1):
        if cu[n + 1] <= cu[n]:
            raise ValueError(
                f"cu_seqlens: expected strictly increasing boundaries, got {cu[n]} then {cu[n + 1]} at index {n + 1}"
            )
    return len(cu) - 1


def _check_state(name: str, s: torch.Tensor, lead: str, N: int | None, HV: int, K: int, V: int,
                 device: torch.device) -> None:
    _check_float(name, s)
    if s.dim() != 4 or (N is not None and s.shape[0] != N) or tuple(s.shape[1:]) != (HV, K, V):
        want = f"[{lead}, HV, K, V] = {(N if N is not None else lead, HV, K, V)}"
        raise ValueError(f"{name}: expected {want}, got {_shape(s)}")
    if s.device != device:
        raise ValueError(f"{name}: expected device {device}, got {s.device}")


def _resolve_backend(backend: str, device: torch.device):
    """Returns the triton module, or None for the torch/reference paths."""
    if backend in ("reference", "torch"):
        return None
    if backend == "auto" and device.type != "cuda":
        return None
    try:
        import hla.ops.kda.triton as kda_triton
    except ImportError as err:
        if backend == "auto":
            return None
        raise ValueError(f"backend: 'triton' requested but hla.ops.kda.triton is unavailable ({err})") from err
    return kda_triton


def _preprocess(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None, lower_bound: float | None, use_qk_l2norm: bool, use_beta_sigmoid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw projections -> the op's inputs, in the compute dtype (float32, or float64 for float64 q)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if use_qk_l2norm:
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    if use_beta_sigmoid:
        beta = torch.sigmoid(beta.to(acc))
    return q, k, g, beta


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_qk_l2norm: bool = False,
    use_beta_sigmoid: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention over whole sequences (prefill and training), differentiable.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``, ``HV`` a multiple of ``H``; value head ``j`` reads q/k head ``j // (HV // H)``.
        g: ``[B, T, HV, K]`` per-channel log-decay (``<= 0``), or the raw gate projection when
            ``A_log`` is given.
        beta: ``[B, T, HV]`` write strength in ``[0, 1]``, or logits with ``use_beta_sigmoid``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``N = B``, or the number of packed sequences), any float
            dtype; the recurrence runs in float32 (float64 for float64 inputs).
        output_final_state: also return the final state ``[N, HV, K, V]``.
        cu_seqlens: ``[N + 1]`` int32/int64, strictly increasing from 0 to T: packed sequences
            (then ``B == 1``); each starts from its own ``initial_state[n]``.
        backend: "auto" | "reference" | "torch" | "triton".
        A_log: ``[HV]`` (any shape with HV elements); if given, ``g`` is the raw gate and the
            decay is ``kda_gate(g, A_log, dt_bias, lower_bound)`` in float32.
        dt_bias: ``[HV * K]`` or ``[HV, K]``, only with ``A_log``.
        lower_bound: negative float for the bounded (sigmoid) gate, only with ``A_log``.
        use_qk_l2norm: l2-normalise q and k inside (float32, eps 1e-6 inside the sqrt).
        use_beta_sigmoid: apply a sigmoid to ``beta``.
        chunk_size: 64 (default), 32 or 16, for the chunked paths.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype`` and the final state (float32; float64 for float64 input)
        or None.

    Raises:
        ValueError: naming the argument, the expected and the actual shape, dtype or value.
    """
    B, T, H, HV, K, V = _check_inputs(q, k, v, g, beta, backend)
    _check_gate_args(HV, K, q.device, A_log, dt_bias, lower_bound)
    scale = _check_scale(scale, K)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: expected one of {CHUNK_SIZES}, got {chunk_size!r}")
    N = B if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        _check_state("initial_state", initial_state, "N", N, HV, K, V, q.device)

    kda_triton = _resolve_backend(backend, q.device)
    if kda_triton is not None:
        return kda_triton.kda_chunk_triton(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
            use_qk_l2norm=use_qk_l2norm, use_beta_sigmoid=use_beta_sigmoid, chunk_size=chunk_size,
        )
    q, k, g, beta = _preprocess(q, k, g, beta, A_log, dt_bias, lower_bound, use_qk_l2norm, use_beta_sigmoid)
    if backend == "reference":
        o, final = kda_reference(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    else:
        o, final = chunk_kda_torch(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    return o.to(v.dtype), final


def kda_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    state_indices: torch.Tensor | None = None,
    backend: str = "auto",
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
    use_qk_l2norm: bool = False,
    use_beta_sigmoid: bool = False,
) -> torch.Tensor:
    """A few KDA steps per sequence against a state pool, which is updated IN PLACE.

    No host synchronisation on the torch and triton paths (CUDA-graph capturable); the reference
    backend is for tests only.

    Args:
        q, k: ``[B, T, H, K]`` with small T (1 for a decode step); v: ``[B, T, HV, V]``;
            g: ``[B, T, HV, K]`` (raw gate with ``A_log``); beta: ``[B, T, HV]``.
        state: ``[P, HV, K, V]`` float32 (float64 allowed for tests) pool of states, P >= B.
        state_indices: ``[B]`` int32/int64, sequence ``b`` uses ``state[state_indices[b]]``;
            default ``arange(B)``. Indices must be distinct (duplicates race); range is checked
            only for CPU tensors (a check on the GPU would sync).
        scale, A_log, dt_bias, lower_bound, use_qk_l2norm, use_beta_sigmoid, backend: as in :func:`kda`.

    Returns:
        ``o: [B, T, HV, V]`` in ``v.dtype``.
    """
    B, T, H, HV, K, V = _check_inputs(q, k, v, g, beta, backend)
    _check_gate_args(HV, K, q.device, A_log, dt_bias, lower_bound)
    scale = _check_scale(scale, K)
    _check_state("state", state, "P", None, HV, K, V, q.device)
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state: expected dtype float32 (the pool's state dtype), got {state.dtype}")
    P = state.shape[0]
    if state_indices is None:
        if P < B:
            raise ValueError(f"state: expected a pool of at least B = {B} states without state_indices, got {P}")
    else:
        if not isinstance(state_indices, torch.Tensor) or state_indices.shape != (B,):
            got = _shape(state_indices) if isinstance(state_indices, torch.Tensor) else type(state_indices).__name__
            raise ValueError(f"state_indices: expected a [B] = [{B}] integer tensor, got {got}")
        if state_indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"state_indices: expected dtype int32 or int64, got {state_indices.dtype}")
        if state_indices.device != state.device:
            raise ValueError(f"state_indices: expected device {state.device}, got {state_indices.device}")
        if state_indices.device.type == "cpu" and B > 0:
            lo, hi = int(state_indices.min()), int(state_indices.max())
            if lo < 0 or hi >= P:
                raise ValueError(
                    f"state_indices: expected values in [0, {P - 1}] (pool size P = {P}), got [{lo}, {hi}]"
                )

    kda_triton = _resolve_backend(backend, q.device)
    if kda_triton is not None:
        return kda_triton.kda_decode_triton(
            q, k, v, g, beta, state, scale=scale, state_indices=state_indices, A_log=A_log, dt_bias=dt_bias,
            lower_bound=lower_bound, use_qk_l2norm=use_qk_l2norm, use_beta_sigmoid=use_beta_sigmoid,
        )
    q, k, g, beta = _preprocess(q, k, g, beta, A_log, dt_bias, lower_bound, use_qk_l2norm, use_beta_sigmoid)
    if backend == "reference":
        idx = torch.arange(B, device=state.device) if state_indices is None else state_indices.long()
        o, final = kda_reference(
            q, k, v, g, beta, scale=scale, initial_state=state.index_select(0, idx), output_final_state=True
        )
        state.index_copy_(0, idx, final.to(state.dtype))
        return o.to(v.dtype)
    return kda_decode_torch(q, k, v, g, beta, state, scale=scale, state_indices=state_indices)
