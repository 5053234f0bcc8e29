"""Registers and spills of the KDA decode kernel, compiled for sm_90a on a machine without a GPU.

Compiles ``kda_decode_kernel`` ahead of time with ``triton.compile`` for a Hopper target and runs
the ptxas that ships with Triton (``-v``) on the PTX, for each (value block, warps) pair. The
signature mimics what the launcher builds at run time for the benchmark shape (H = HV = 32,
K = V = 128, bf16 tokens, fp32 state, Kimi gate with dt_bias, l2norm and beta-sigmoid fused):

- every pointer argument carries ``tt.divisibility = 16``, as the launcher sets it for 16-byte
  aligned tensors (all fresh torch allocations); ``--no-align`` drops it (the loads are then
  scalar instead of 128-bit, and the register count is not what a real launch gets);
- ``T = 1`` is a compile-time constant, as the launcher specialises integer arguments equal to 1;
  ``--T n`` keeps it a runtime loop (multi-token steps).

    PYTHONPATH=src python3 benchmarks/kda_regs.py [--bv 16,32,64] [--warps 2,4,8] [--T 1|n] [--no-align]
        [--maxnreg 128]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kda_regs.py compiles for a GPU target: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from hla.ops.kda.triton.decode import kda_decode_kernel  # noqa: E402

SIGNATURE = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*bf16", "beta": "*bf16", "state": "*fp32",
             "state_indices": "*i32", "o": "*bf16", "A_log": "*fp32", "dt_bias": "*fp32",
             "scale": "fp32", "lower_bound": "fp32", "T": "i32"}
SM90 = GPUTarget("cuda", 90, 32)
# 64K 32-bit registers and at most 32 blocks / 2048 threads per SM on sm_90; registers are
# allocated per warp in units of 256.
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32


def ptxas_report(ptx: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", r.stderr).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", r.stderr).group(1))
    return dict(regs=regs, spill_stores=spill_st, spill_loads=spill_ld)


def compile_sm90(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 1,
                 align: bool = True, maxnreg: int | None = None):
    """Compile any @triton.jit (or @gluon.jit) kernel for sm_90a without a GPU; returns triton's compiled kernel
    (asm["ptx"], asm["cubin"], metadata).

    types: the non-constexpr arguments ("*bf16", "*fp32", "i32", "fp32", ``tma_type(...)``, ...); every other argument
    must be in constexprs (entries that are not arguments of fn are dropped, so callers can share one
    dict across kernels). With align, pointers carry the 16-byte divisibility hint the launcher
    gives torch allocations (without it no load is vectorised and the counts are not the GPU's)."""
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = ({(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
              if types.get(n, "").startswith("*")} if align else {})
    source = GluonASTSource if fn.is_gluon() else ASTSource
    src = source(fn=fn, signature=sig, attrs=attrs,
                 constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names})
    options = {"num_warps": num_warps, "num_stages": num_stages} | ({"maxnreg": maxnreg} if maxnreg else {})
    return triton.compile(src, target=SM90, options=options)


def tma_type(shape: tuple[int, int], block: list[int], dtype, layout=None) -> str:
    """The signature type of a Gluon TMA descriptor argument (what the launcher derives from a TensorDescriptor of
    a `shape` tensor of torch `dtype` with boxes of `block` in `layout`, by default the default NVMMA shared layout)."""
    layout = layout or gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16
                                                            else gl.float32)
    return mangle_type(TensorDescriptor.from_tensor(torch.zeros(shape, dtype=dtype), block, layout))


def compile_report(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 1,
                   align: bool = True, maxnreg: int | None = None) -> dict:
    """``compile_sm90``, then ptxas' registers / spills plus the shared memory."""
    compiled = compile_sm90(fn, types, constexprs, num_warps, num_stages, align, maxnreg)
    return ptxas_report(compiled.asm["ptx"]) | dict(shared=compiled.metadata.shared)


def blocks_per_sm(regs: int, num_warps: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    return min(REGS_PER_SM // (per_warp * num_warps), MAX_THREADS_PER_SM // (32 * num_warps), MAX_BLOCKS_PER_SM)


def compile_decode(bv: int, num_warps: int, t_const: bool, align: bool, H: int = 32, K: int = 128,
                   maxnreg: int | None = None) -> dict:
    consts = dict(H=H, HV=H, K=K, V=K, BK=triton.next_power_of_2(K), BV=bv, HAS_GATE=True, HAS_BIAS=True,
                  HAS_LB=False, USE_L2=True, USE_SIGMOID=True)
    types = dict(SIGNATURE)
    if t_const:
        consts["T"] = 1
        del types["T"]
    return compile_report(kda_decode_kernel, types, consts, num_warps, align=align, maxnreg=maxnreg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bv", default="16,32,64", help="value-block widths (comma list)")
    ap.add_argument("--warps", default="2,4,8", help="num_warps values (comma list)")
    ap.add_argument("--T", default="1", choices=["1", "n"], help="1: T=1 constant (decode); n: runtime T")
    ap.add_argument("--no-align", action="store_true", help="compile without the 16-byte pointer hints")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (ptx .maxnreg)")
    ap.add_argument("--dim", type=int, default=128, help="K = V")
    ap.add_argument("--heads", type=int, default=2048, help="batch x value heads, for the waves column")
    ap.add_argument("--sms", type=int, default=132, help="SM count, for the waves column (H100/H200 SXM: 132)")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a, T={args.T}, pointer alignment hints: {not args.no_align}, "
          f"maxnreg {args.maxnreg}; "
          f"waves for {args.heads} heads on {args.sms} SMs")
    print("| BV | warps | registers | spill stores B | spill loads B | blocks/SM | waves |")
    print("|---|---|---|---|---|---|---|")
    for bv in (int(x) for x in args.bv.split(",")):
        for nw in (int(x) for x in args.warps.split(",")):
            r = compile_decode(bv, nw, args.T == "1", not args.no_align, K=args.dim,
                               maxnreg=args.maxnreg)
            nb = blocks_per_sm(r["regs"], nw)
            waves = args.heads * triton.cdiv(args.dim, bv) / (nb * args.sms)
            print(f"| {bv} | {nw} | {r['regs']} | {r['spill_stores']} | {r['spill_loads']} | {nb} | {waves:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
