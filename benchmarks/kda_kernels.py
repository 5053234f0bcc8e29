"""KDA kernels, ours (hla.ops.kda.triton) against FLA 0.6.0, in one run on one card.

Chunked prefill: forward and forward+backward at (B, T, H, D) = (1, 8192, 32, 128),
(4, 8192, 32, 128), (1, 32768, 32, 128), (1, 8192, 96, 128), for the unbounded Kimi gate and the
bounded gate (lower_bound = -5; FLA with safe_gate=True). Both sides take bf16 raw projections and
fuse gate, l2norm and beta-sigmoid in-kernel. Decode: one step inside a CUDA graph at batch 1, 8,
64, 256 (H = 32, D = 128), state pool in place, GB/s of fp32 state read + write against the copy
ceiling measured here, then a sweep of launch settings. Prints a markdown table; with --out DIR
also writes it there (markdown + JSON, rewritten after every row, so a run cut by a time limit
keeps what it finished).

    PYTHONPATH=src python3 benchmarks/kda_kernels.py [--out DIR] [--shapes 0,1,2,3] [--gates kimi,safe]
        [--no-prefill] [--no-bwd] [--no-decode] [--no-sweep] [--decode-batches 1,8,64,256] [--stages]
        [--intra-wgmma {inference,always,off}]

Examples that fit a 600 s call: `--shapes 0 --gates kimi --stages --no-decode` (stage times and
one prefill row), `--no-prefill` (decode table and sweep only), `--shapes 1,2 --no-bwd`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from hla.bench.timing import copy_bandwidth
from hla.ops.kda.triton import kda_chunk_triton, kda_decode_triton

fla_chunk_kda = fla_recurrent_fwd = None


def load_fla() -> None:
    """Import the peer (FLA) if installed; its columns stay empty otherwise."""
    global fla_chunk_kda, fla_recurrent_fwd
    try:
        from fla.ops.kda import chunk_kda
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer in this run"
        print(f"FLA not importable ({type(e).__name__}: {e}); peer columns will be empty", file=sys.stderr)
        return
    fla_chunk_kda, fla_recurrent_fwd = chunk_kda, fused_recurrent_kda_fwd


DEV = torch.device("cuda")
SHAPES = [(1, 8192, 32, 128), (4, 8192, 32, 128), (1, 32768, 32, 128), (1, 8192, 96, 128)]
GATES = ("kimi", "safe")
DECODE_BATCHES = (1, 8, 64, 256)
# Decode launch settings (batch, value block, warps, register cap or None), H = 32, D = 128.
# Registers per thread for sm_90a at T = 1 (benchmarks/kda_regs.py), blocks per SM in brackets:
# BV16/w2 72 (14), BV32/w2 127 (8), BV32/w4 72 (7), BV64/w4 127 (4), BV64/w8 97 (2),
# BV128/w8 174 (1); a cap of 128 on BV128/w8 gives 2 blocks per SM for 88 B of spills.
DECODE_SWEEP = [(1, 16, 1, None), (1, 16, 2, None), (1, 32, 2, None),
                (64, 16, 2, None), (64, 32, 2, None), (64, 32, 4, None), (64, 64, 4, None), (64, 64, 8, None),
                (64, 128, 8, None), (64, 128, 8, 128),
                (256, 32, 2, None), (256, 32, 4, None), (256, 64, 4, None), (256, 64, 8, None)]


def ms(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=25, rep=120, grad_to_none=grad_to_none, return_mode="median")


def warm_host(fns, seconds: float = 3.0) -> None:
    """Call fns (the first row's forwards) in turn for `seconds` before anything is timed. On the device machine the
    host issued a B1 T8192 forward in 0.75-1.0 ms during a process's first seconds of calls and in 0.37-0.47 ms after
    (session 21, a sync before each call); that forward's GPU time is ~0.6 ms, so rows timed in those first seconds
    read the host's warm-up (B1 0.79-0.93 ms in three runs, 0.58-0.63 once warm)."""
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            for fn in fns:
                fn()
    torch.cuda.synchronize()


def copy_ceiling() -> float:
    return copy_bandwidth(DEV) / 1e9


def gemm_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = ms(lambda: a @ b)
    return 2 * n**3 / (t * 1e-3) / 1e12


def prefill_inputs(B, T, H, D, gate):
    """Benchmark inputs, the same draw for a (shape, gate) whatever ran before: our time depends on
    the draw (A_log per head decides how many key blocks need the exact intra pass)."""
    torch.manual_seed(B * 1_000_003 + T * 131 + H * 7 + D)  # both gates of a shape: the same tensors
    bf = torch.bfloat16
    x = dict(
        q=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        k=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        v=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        g=torch.randn(B, T, H, D, device=DEV, dtype=bf),
        beta=torch.randn(B, T, H, device=DEV, dtype=bf),
        A_log=torch.empty(H, device=DEV).uniform_(1, 16).log(),
        dt_bias=torch.randn(H * D, device=DEV) * 0.5 - 3,
    )
    x["lower_bound"] = -5.0 if gate == "safe" else None
    return x


def ours_fwd(x):
    return kda_chunk_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=x["q"].shape[-1] ** -0.5,
                            initial_state=None, output_final_state=False, cu_seqlens=None, A_log=x["A_log"],
                            dt_bias=x["dt_bias"], lower_bound=x["lower_bound"], use_qk_l2norm=True,
                            use_beta_sigmoid=True, chunk_size=64)[0]


def fla_fwd(x):
    return fla_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                         safe_gate=x["lower_bound"] is not None, lower_bound=x["lower_bound"])[0]


@contextlib.contextmanager
def grad_leaves(x):
    """The differentiable inputs of ``x`` with requires_grad set for the block, cleared (and their
    grads dropped) after it."""
    leaves = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    for t in leaves:
        t.requires_grad_(True)
    try:
        yield leaves
    finally:
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None


def time_prefill(fwd, x, backward=True):
    with torch.no_grad():
        t_f = ms(lambda: fwd(x))
    if not backward:
        return t_f, float("nan")
    do = torch.randn_like(x["v"])

    def step():
        fwd(x).backward(do)

    with grad_leaves(x) as leaves:
        t_fb = ms(step, grad_to_none=leaves)
    return t_f, t_fb


def graph_mb(fwd, x) -> float:
    """MB the autograd graph of one forward keeps for the backward: memory allocated after the forward,
    less before it and less the output (the inputs exist either way)."""
    with grad_leaves(x):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        o = fwd(x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base - o.numel() * o.element_size()
        del o
    return held / 1e6


def decode_inputs(B, H, D, sets):
    bf = torch.bfloat16
    steps = []
    for i in range(sets):
        steps.append(dict(
            q=torch.randn(B, 1, H, D, device=DEV, dtype=bf), k=torch.randn(B, 1, H, D, device=DEV, dtype=bf),
            v=torch.randn(B, 1, H, D, device=DEV, dtype=bf), g=torch.randn(B, 1, H, D, device=DEV, dtype=bf),
            beta=torch.randn(B, 1, H, device=DEV, dtype=bf),
            idx=torch.arange(i * B, (i + 1) * B, device=DEV, dtype=torch.int32),
        ))
    pool = torch.randn(sets * B, H, D, D, device=DEV) * 0.05
    A_log = torch.empty(H, device=DEV).uniform_(1, 16).log()
    dt_bias = torch.randn(H * D, device=DEV) * 0.5 - 3
    return steps, pool, A_log, dt_bias


def time_graph(call, steps) -> float:
    """One decode step's time: `len(steps)` steps (each on its own pool slots, so the state does not
    sit in L2) captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for st in steps:
            call(st)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for st in steps:
            call(st)
    return ms(graph.replay) / len(steps)


def bench_decode(B, H, D, block_v=None):
    sets = max(4, min(16, math.ceil(256 / B)))
    steps, pool, A_log, dt_bias = decode_inputs(B, H, D, sets)

    def ours(st):
        kda_decode_triton(st["q"], st["k"], st["v"], st["g"], st["beta"], pool, scale=D**-0.5,
                          state_indices=st["idx"], A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=True,
                          use_beta_sigmoid=True, block_v=block_v)

    def fla(st):
        fla_recurrent_fwd(st["q"], st["k"], st["v"], st["g"], st["beta"], A_log=A_log, dt_bias=dt_bias,
                          scale=D**-0.5, initial_state=pool, inplace_final_state=True,
                          ssm_state_indices=st["idx"], use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                          use_beta_sigmoid_in_kernel=True)

    t_ours = time_graph(ours, steps)
    t_fla = time_graph(fla, steps) if fla_recurrent_fwd is not None else float("nan")
    nbytes = B * H * D * D * 4 * 2
    return t_ours, t_fla, nbytes


def forward_stage_calls(x: dict, chunk_size: int = 64) -> dict:
    """Zero-argument callables, one per stage of our chunked forward, each called the way
    ``chunk.py``'s forward calls it; the inputs of each stage are produced once here, so a
    callable times its stage alone. Adapt this function (only) when the stage functions change."""
    from hla.ops.kda.triton import chunk as chunk_module
    from hla.ops.kda.triton import intra as intra_module
    from hla.ops.kda.triton.chunk import _ChunkMeta
    from hla.ops.kda.triton.intra import kda_intra_fwd
    from hla.ops.kda.triton.recurrence import kda_recurrence_fwd

    B, T, H, K = x["q"].shape
    meta = _ChunkMeta(B, T, None, chunk_size, DEV)
    q, k, v, g, beta = (x[n].reshape(B * T, *x[n].shape[2:]) for n in ("q", "k", "v", "g", "beta"))

    def intra(premultiply=None):
        pre = chunk_module.PREMULTIPLY if premultiply is None else premultiply
        return kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, scale=K**-0.5, A_log=x["A_log"],
                             dt_bias=x["dt_bias"], lower_bound=x["lower_bound"], use_qk_l2norm=True,
                             use_beta_sigmoid=True, chunk_size=meta.BT, premultiply=pre)

    walk_st = {pre: intra(pre) for pre in (False, True)}
    walk_st[True] = dict(walk_st[True], Aqk=walk_st[True]["AqkM"])  # as chunk.py hands it to the walk

    def recurrence(block_v=None, premultiplied=None):
        pre = chunk_module.PREMULTIPLY if premultiplied is None else premultiplied
        return kda_recurrence_fwd(walk_st[pre], meta.cu, meta.chunk_offsets, initial_state=None,
                                  output_final_state=False, out_dtype=v.dtype, store_h=False, block_v=block_v,
                                  premultiplied=pre)

    def with_flag(module, name: str, on: bool, fn):
        def call():
            saved = getattr(module, name)
            setattr(module, name, on)
            try:
                return fn()
            finally:
                setattr(module, name, saved)
        return call

    calls = {"intra": intra, "recurrence": recurrence}
    # the walk's operands as chunk.PREMULTIPLY picks them, and the other form
    calls["intra, plain operands (PREMULTIPLY off)"] = lambda: intra(False)
    calls["recurrence, plain operands"] = lambda: recurrence(premultiplied=False)
    calls["intra, premultiplied"] = lambda: intra(True)
    calls["recurrence, premultiplied"] = lambda: recurrence(premultiplied=True)
    # the intra stage with the tl fast launch and with the Gluon one (intra.INTRA_WGMMA; the tl one off Hopper)
    calls["intra, INTRA_WGMMA off"] = with_flag(intra_module, "INTRA_WGMMA", "off", intra)
    calls["intra, INTRA_WGMMA on"] = with_flag(intra_module, "INTRA_WGMMA", "always", intra)
    # an explicit block width keeps the tl walk ("recurrence" runs the Gluon walk on Hopper with bf16 tiles)
    for bv in (16, 32, 64):
        calls[f"recurrence BV={bv}"] = lambda bv=bv: recurrence(bv)
    return calls


def backward_stage_calls(x: dict, chunk_size: int = 64) -> dict:
    """The backward's launches alone, called the way ``chunk.py``'s backward calls them (inputs from
    one recomputed forward). Adapt this function (only) when the backward changes."""
    from hla.ops.kda.triton.chunk import _ChunkMeta
    from hla.ops.kda.triton.intra import kda_intra_fwd
    from hla.ops.kda.triton.intra_bwd import intra_bwd_dkk, kda_intra_bwd
    from hla.ops.kda.triton.recurrence import kda_recurrence_fwd
    from hla.ops.kda.triton.recurrence_bwd import kda_state_grad, kda_state_grad_chain, kda_state_grad_products

    B, T, H, K = x["q"].shape
    meta = _ChunkMeta(B, T, None, chunk_size, DEV)
    q, k, v, g, beta = (x[n].reshape(B * T, *x[n].shape[2:]) for n in ("q", "k", "v", "g", "beta"))
    kw = dict(scale=K**-0.5, A_log=x["A_log"], dt_bias=x["dt_bias"], lower_bound=x["lower_bound"],
              use_qk_l2norm=True, use_beta_sigmoid=True)
    st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, chunk_size=meta.BT, **kw)
    saved = {n: st[n] for n in ("Aqk", "P", "M")}
    # the recompute as chunk.py's backward runs it (with Gamma and the norms for the block launch)
    st = kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, chunk_size=meta.BT, **kw, saved=saved, store_gamma=True)

    def states():
        return kda_recurrence_fwd(st, meta.cu, meta.chunk_offsets, initial_state=None, output_final_state=False,
                                  out_dtype=v.dtype, store_h=True, write_o=False)

    _, _, h, vnew = states()
    do = torch.randn_like(v)

    def chain():
        return kda_state_grad_chain(st, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False)

    dh, dvnew, _ = chain()
    gr = kda_state_grad(st, h, vnew, do, None, meta.cu, meta.chunk_offsets, meta.chunk_bounds, need_dh0=False)
    return {
        "bwd: stage-1 recompute (per-token tensors; A_qk, P, M saved by the forward)":
            lambda: kda_intra_fwd(q, k, v, g, beta, meta.chunk_bounds, chunk_size=meta.BT, **kw, saved=saved,
                                  store_gamma=True),
        "bwd: states (recurrence storing h, v_new)": states,
        # an explicit block_v keeps the tl walk (the row above runs the Gluon walk on Hopper)
        "bwd: states, tl walk (BV 32)": lambda: kda_recurrence_fwd(
            st, meta.cu, meta.chunk_offsets, initial_state=None, output_final_state=False, out_dtype=v.dtype,
            store_h=True, write_o=False, block_v=32),
        "bwd: state-grad chain (A_qk^T do launch + the walk)": chain,
        "bwd: state-grad products": lambda: kda_state_grad_products(st, h, vnew, dh, dvnew, do, meta.chunk_bounds),
        "bwd: intra backward": lambda: kda_intra_bwd(q, k, v, g, beta, meta.chunk_bounds, st, gr, **kw),
        "bwd: intra backward launch 1 (dA_kk; launch 2 = the row above minus this)":
            lambda: intra_bwd_dkk(v, beta, meta.chunk_bounds, st, gr, use_beta_sigmoid=True, dv_dtype=v.dtype),
    }


def decode_launch_us(B: int, bv: int, nw: int, maxnreg: int | None, H: int = 32, D: int = 128) -> float:
    """One decode step (microseconds) with the launch settings forced."""
    sets = max(4, min(16, math.ceil(256 / B)))
    steps, pool, A_log, dt_bias = decode_inputs(B, H, D, sets)

    def call(st):
        kda_decode_triton(st["q"], st["k"], st["v"], st["g"], st["beta"], pool, scale=D**-0.5,
                          state_indices=st["idx"], A_log=A_log, dt_bias=dt_bias, use_qk_l2norm=True,
                          use_beta_sigmoid=True, block_v=bv, num_warps=nw, max_registers=maxnreg)

    return time_graph(call, steps) * 1e3


def profile_stages(shape, gate: str, report: Report, backward: bool) -> None:
    """Time each forward stage alone, then the whole forward (and with ``backward`` the reverse
    recurrence), at one prefill shape. A stage that fails to set up or run (e.g. a changed
    signature) is reported and skipped, so the rest of the run goes on."""
    B, T, H, D = shape
    x = prefill_inputs(B, T, H, D, gate)
    where = f"B{B} T{T} H{H} D{D}, {gate} gate"
    calls = {}
    for make in (forward_stage_calls, backward_stage_calls) if backward else (forward_stage_calls,):
        try:
            calls.update(make(x))
        except Exception as e:  # noqa: BLE001 - report and go on with the other measurements
            report.add_stage(f"{make.__name__} failed ({where}): {type(e).__name__}: {e}")
    for name, fn in calls.items():
        try:
            report.add_stage(f"stage {name} ({where}): {ms(fn):.3f} ms")
        except Exception as e:  # noqa: BLE001
            report.add_stage(f"stage {name} ({where}): failed, {type(e).__name__}: {e}")
    with torch.no_grad():
        report.add_stage(f"whole forward ({where}): {ms(lambda: ours_fwd(x)):.3f} ms")


def _f(x: float, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def _ratio(num: float, den: float) -> str:
    return "-" if num is None or den is None or math.isnan(num) or math.isnan(den) else f"{num / den:.2f}x"


class Report:
    """Everything measured so far; ``save`` rewrites the markdown and JSON under --out after each
    row, so a run cut by a time limit still leaves its finished rows."""

    def __init__(self, head: str, out: str | None, card: str):
        self.head, self.out, self.card = head, out, card
        self.bw = self.tf = float("nan")
        self.rows, self.drows, self.sweep, self.stages = [], [], [], []

    def add_stage(self, line: str) -> None:
        print(line, flush=True)
        self.stages.append(line)
        self.save()

    def markdown(self) -> str:
        lines = [self.head, "", f"Copy ceiling {_f(self.bw, '.0f')} GB/s (read+write of a 1 GiB fp32 buffer); "
                 f"bf16 GEMM 8192^3 {_f(self.tf, '.0f')} TFLOP/s.", ""]
        if self.rows:
            lines += ["Graph MB: memory one forward's autograd graph holds for the backward (beyond inputs and "
                      "output).", "",
                      "| B | T | H | D | gate | fwd ours ms | fwd FLA ms | fwd speedup | fwd+bwd ours ms | "
                      "fwd+bwd FLA ms | fwd+bwd speedup | graph MB ours / FLA |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in self.rows:
                lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['gate']} | "
                             f"{_f(r['ours_fwd'], '.3f')} | {_f(r['fla_fwd'], '.3f')} | "
                             f"{_ratio(r['fla_fwd'], r['ours_fwd'])} | {_f(r['ours_fb'], '.3f')} | "
                             f"{_f(r['fla_fb'], '.3f')} | {_ratio(r['fla_fb'], r['ours_fb'])} | "
                             f"{_f(r.get('mb_ours'), '.0f')} / {_f(r.get('mb_fla'), '.0f')} |")
        if self.drows:
            lines += ["", "Decode step (T=1, H=32, D=128, fp32 state pool in place, CUDA graph):", "",
                      "| batch | ours us | ours GB/s | ours % copy | FLA us | FLA GB/s | FLA % copy | speedup |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in self.drows:
                lines.append(f"| {d['B']} | {_f(d['ours_us'], '.1f')} | {_f(d['ours_gbs'], '.0f')} | "
                             f"{_f(d['ours_gbs'] / self.bw, '.0%')} | {_f(d['fla_us'], '.1f')} | "
                             f"{_f(d['fla_gbs'], '.0f')} | {_f(d['fla_gbs'] / self.bw, '.0%')} | "
                             f"{_ratio(d['fla_us'], d['ours_us'])} |")
        if self.stages:
            lines += ["", "Stage profile:", ""] + [f"- {p}" for p in self.stages]
        if self.sweep:
            lines += ["", "Decode launch sweep (us, % of copy; w = warps, r = register cap): " + ", ".join(
                f"B{d['B']}/BV{d['BV']}/w{d['nw']}" + (f"/r{d['maxnreg']}" if d["maxnreg"] else "")
                + f"={d['us']:.1f} ({_f(d['gbs'] / self.bw, '.0%')})" for d in self.sweep)]
        return "\n".join(lines)

    def save(self) -> None:
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)

        def clean(v):  # NaN (no FLA, no backward) -> null: strict JSON
            return None if isinstance(v, float) and math.isnan(v) else v

        data = dict(card=self.card, copy_gbs=clean(self.bw), gemm_tflops=clean(self.tf),
                    prefill=[{k: clean(v) for k, v in r.items()} for r in self.rows],
                    decode=[{k: clean(v) for k, v in r.items()} for r in self.drows],
                    sweep=self.sweep, stages=self.stages)
        for name, text in (("kda_kernels.md", self.markdown() + "\n"), ("kda_kernels.json", json.dumps(data))):
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name))  # a kill mid-write leaves the last full file


def _int_list(text: str, allowed=None) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if allowed is not None and any(v not in allowed for v in vals):
        raise argparse.ArgumentTypeError(f"each entry must be one of {sorted(allowed)}, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="KDA kernels (ours vs FLA): chunked prefill and decode.",
                                 epilog="Shapes (B, T, H, D): " + ", ".join(f"{i}={s}" for i, s in enumerate(SHAPES)))
    ap.add_argument("--out", default=None, help="directory for kda_kernels.md / .json, rewritten after each row")
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))),
                    type=lambda t: _int_list(t, set(range(len(SHAPES)))),
                    help="comma list of prefill shape indices (default: all)")
    ap.add_argument("--gates", default=",".join(GATES), type=lambda t: [g for g in t.split(",") if g],
                    help="comma list of gates: kimi (unbounded), safe (lower_bound -5); default both")
    ap.add_argument("--quick", action="store_true", help="same as --shapes 0")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    ap.add_argument("--no-bwd", action="store_true", help="prefill: forward only")
    ap.add_argument("--fwd-only-after", type=int, default=99,
                    help="time fwd+bwd for the first N selected shapes only")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode table and the decode sweep")
    ap.add_argument("--decode-batches", default=",".join(str(b) for b in DECODE_BATCHES),
                    type=_int_list, help="decode batch sizes (default 1,8,64,256)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the decode launch sweep")
    ap.add_argument("--intra-wgmma", choices=("inference", "always", "off"), default=None,
                    help="where our prefill takes the Gluon fast intra launch (intra.INTRA_WGMMA; default: its "
                         "setting, 'inference': the forward-only timings; Hopper)")
    ap.add_argument("--stages", action="store_true",
                    help="time each stage of our forward alone (and the reverse recurrence unless --no-bwd) "
                         "at the first selected shape and gate")
    args = ap.parse_args(argv)
    bad = [g for g in args.gates if g not in GATES]
    if bad or not args.gates:
        ap.error(f"--gates: expected a comma list of {', '.join(GATES)}, got {','.join(args.gates) or 'nothing'}")
    if args.quick:
        args.shapes = [0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.intra_wgmma:
        from hla.ops.kda.triton import intra

        intra.INTRA_WGMMA = args.intra_wgmma
    load_fla()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    fla_ver = getattr(sys.modules.get("fla"), "__version__", "not importable")
    argv_used = argv if argv is not None else sys.argv[1:]
    command = " ".join(["PYTHONPATH=src python3 benchmarks/kda_kernels.py", *argv_used])
    head = (f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, FLA {fla_ver}; "
            f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: {command}")
    print(head, flush=True)
    rep = Report(head, args.out, card)
    t0 = time.perf_counter()
    rep.bw = copy_ceiling()
    rep.tf = gemm_ceiling()
    print(f"copy ceiling {rep.bw:.0f} GB/s (read+write), bf16 GEMM 8192^3 {rep.tf:.0f} TFLOP/s", flush=True)
    rep.save()
    shapes = [SHAPES[i] for i in args.shapes]
    if args.stages and shapes:
        profile_stages(shapes[0], args.gates[0], rep, backward=not args.no_bwd)
        torch.cuda.empty_cache()  # the stage inputs and outputs are gone with the call
    if not args.no_prefill and shapes:
        x = prefill_inputs(*shapes[0], args.gates[0])
        warm_host([lambda: ours_fwd(x)] + ([lambda: fla_fwd(x)] if fla_chunk_kda is not None else []))
        del x
    if not args.no_prefill:
        for i_s, (B, T, H, D) in enumerate(shapes):
            for gate in args.gates:
                x = prefill_inputs(B, T, H, D, gate)
                bwd = not args.no_bwd and i_s < args.fwd_only_after
                of, ofb = time_prefill(ours_fwd, x, bwd)
                ff, ffb = time_prefill(fla_fwd, x, bwd) if fla_chunk_kda is not None else (float("nan"),) * 2
                nan = float("nan")
                mb = (graph_mb(ours_fwd, x) if bwd else nan,
                      graph_mb(fla_fwd, x) if bwd and fla_chunk_kda is not None else nan)
                rep.rows.append(dict(kind="prefill", B=B, T=T, H=H, D=D, gate=gate, ours_fwd=of, fla_fwd=ff,
                                     ours_fb=ofb, fla_fb=ffb, mb_ours=mb[0], mb_fla=mb[1]))
                rep.save()
                print(f"B{B} T{T} H{H} D{D} {gate:5}: fwd ours {of:.3f} ms FLA {_f(ff, '.3f')} ms "
                      f"({_ratio(ff, of)}) | fwd+bwd ours {_f(ofb, '.3f')} ms FLA {_f(ffb, '.3f')} ms "
                      f"({_ratio(ffb, ofb)}) | graph MB ours {_f(mb[0], '.0f')} FLA {_f(mb[1], '.0f')} "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
                del x
                torch.cuda.empty_cache()
    if not args.no_decode:
        for B in args.decode_batches:
            to, tfla, nb = bench_decode(B, 32, 128)
            rep.drows.append(dict(kind="decode", B=B, ours_us=to * 1e3, fla_us=tfla * 1e3, bytes=nb,
                                  ours_gbs=nb / (to * 1e-3) / 1e9, fla_gbs=nb / (tfla * 1e-3) / 1e9))
            rep.save()
            d = rep.drows[-1]
            print(f"decode B{B}: ours {d['ours_us']:.1f} us ({d['ours_gbs']:.0f} GB/s, {d['ours_gbs'] / rep.bw:.0%} "
                  f"of copy) FLA {_f(d['fla_us'], '.1f')} us ({_f(d['fla_gbs'], '.0f')} GB/s, "
                  f"{_f(d['fla_gbs'] / rep.bw, '.0%')}) "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if not args.no_sweep:
            for B, bv, nw, nreg in DECODE_SWEEP:
                t = decode_launch_us(B, bv, nw, nreg)
                nb = B * 32 * 128 * 128 * 4 * 2
                rep.sweep.append(dict(B=B, BV=bv, nw=nw, maxnreg=nreg, us=t, gbs=nb / (t * 1e-6) / 1e9))
                rep.save()
                print(f"  decode sweep B{B} BV{bv} warps{nw} maxnreg {nreg}: {t:.1f} us "
                      f"({rep.sweep[-1]['gbs'] / rep.bw:.0%} of copy)", flush=True)
    print("\n" + rep.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
