"""The intra-chunk stage in PyTorch, differentiable: the backward pass of stage 2 runs autograd
through this function (recomputing it chunk slice by chunk slice), fed with the gradients the
Triton reverse recurrence produced. It uses the same anchors as the kernel, so nothing overflows.
"""

from __future__ import annotations

import torch

from hla.ops.kda.gate import kda_gate, l2norm


def intra_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    idx: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_qk_l2norm: bool,
    use_beta_sigmoid: bool,
) -> dict[str, torch.Tensor]:
    """Stage-2 quantities for a set of chunks.

    Args:
        q, k: ``[TT + 1, H, K]``, v ``[TT + 1, HV, V]``, g ``[TT + 1, HV, K]`` (raw gate when A_log),
            beta ``[TT + 1, HV]``: flattened tokens plus one zero padding row at the end.
        idx: ``[C, BT]`` token index of each chunk row (padding rows point at the last row).
        valid: ``[C, BT]`` bool.

    Returns (all fp32, chunk layout ``[C, HV, BT, *]``): w, u, qg (= scale q exp(Gamma)),
    kd (= k exp(Gamma_last - Gamma)), Aqk ``[C, HV, BT, BT]``, dl (= exp(Gamma_last)) ``[C, HV, K]``.
    """
    f32 = torch.float32
    H, HV = q.shape[1], v.shape[1]
    G = HV // H
    C, BT = idx.shape
    BC = 16
    vm = valid[:, :, None, None].to(f32)
    qc = q[idx].to(f32)  # [C, BT, H, K]
    kc = k[idx].to(f32)
    if use_qk_l2norm:
        qc, kc = l2norm(qc), l2norm(kc)
    qc = qc.repeat_interleave(G, dim=2).transpose(1, 2) * scale  # [C, HV, BT, K]
    kc = kc.repeat_interleave(G, dim=2).transpose(1, 2)
    gc = g[idx]
    gc = kda_gate(gc, A_log, dt_bias, lower_bound) if A_log is not None else gc.to(f32)
    gc = (gc * vm).transpose(1, 2)  # [C, HV, BT, K]
    bc = beta[idx].to(f32)
    if use_beta_sigmoid:
        bc = torch.sigmoid(bc)
    bc = (bc * valid[:, :, None].to(f32)).transpose(1, 2)  # [C, HV, BT]
    vc = v[idx].to(f32).transpose(1, 2)  # [C, HV, BT, V]

    Gm = gc.cumsum(2)
    rows = torch.arange(BT, device=q.device)
    A_qk = []
    A_kk = []
    neg_inf = torch.tensor(float("-inf"), device=q.device, dtype=f32)
    for ib in range(BT // BC):
        sl = slice(ib * BC, ib * BC + BC)
        Gr = Gm[:, :, sl]  # [C, HV, BC, K]
        Ga = Gm[:, :, ib * BC : ib * BC + 1]  # anchor row
        col = (rows < ib * BC)[None, None, :, None]
        kf = kc * torch.where(col, Ga - Gm, neg_inf).exp()
        ef = (Gr - Ga).exp()
        off_qk = (qc[:, :, sl] * ef) @ kf.transpose(-1, -2)  # [C, HV, BC, BT]
        off_kk = (kc[:, :, sl] * ef) @ kf.transpose(-1, -2)
        ii = torch.arange(BC, device=q.device)
        pair = (ii[:, None] >= ii[None, :])[None, None, :, :, None]
        e = torch.where(pair, Gr[:, :, :, None, :] - Gr[:, :, None, :, :], neg_inf).exp()  # [C,HV,BC,BC,K]
        kde = kc[:, :, sl][:, :, None, :, :] * e
        d_qk = (qc[:, :, sl][:, :, :, None, :] * kde).sum(-1)
        d_kk = (kc[:, :, sl][:, :, :, None, :] * kde).sum(-1)
        d_kk = torch.where((ii[:, None] > ii[None, :]), d_kk, 0.0)
        pad = (0, BT - ib * BC - BC)
        A_qk.append(torch.cat([off_qk[..., : ib * BC], torch.nn.functional.pad(d_qk, pad)], -1))
        A_kk.append(torch.cat([off_kk[..., : ib * BC], torch.nn.functional.pad(d_kk, pad)], -1) * bc[:, :, sl, None])
    A_qk = torch.cat(A_qk, 2)
    A_kk = torch.cat(A_kk, 2)
    eye = torch.eye(BT, device=q.device, dtype=f32)
    M = torch.linalg.solve_triangular(eye + A_kk, eye.expand_as(A_kk), upper=False, unitriangular=True)
    w = M @ (kc * Gm.exp() * bc[..., None])
    u = M @ (vc * bc[..., None])
    Gl = Gm[:, :, -1:]  # padding rows carry g = 0, so the last row holds the last valid Gamma
    kd = kc * (Gl - Gm).exp()
    return dict(w=w, u=u, qg=qc * Gm.exp(), kd=kd, Aqk=A_qk, dl=Gl[:, :, 0].exp())
