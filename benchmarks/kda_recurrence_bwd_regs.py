"""Registers and spills of the KDA recurrence-backward kernels, compiled for sm_90a on the CPU (no GPU).

    PYTHONPATH=src python benchmarks/kda_recurrence_bwd_regs.py

triton.compile produces the PTX for an sm_90a target; the ptxas bundled with triton reports
registers, stack frame and spill bytes per kernel. Shapes: HV=32, K=V=128, bf16 w/qg/kd/do.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hla.ops.kda.triton.recurrence_bwd import (  # noqa: E402
    kda_state_grad_chain_kernel,
    kda_state_grad_products_kernel,
)


def ptxas_report(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 1) -> str:
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    # Pointers 16-byte aligned, as the launcher specialises them for torch allocations; without this
    # hint no load is vectorised and the register counts are far from what the GPU runs.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = get_ptxas(90).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ck.asm["ptx"])
        f.flush()
        res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = " ".join(res.stderr.split())
    regs = re.search(r"Used (\d+) registers", text)
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"regs {regs.group(1)}, stack {stack.group(1)} B, spill stores {stack.group(2)} B, "
            f"spill loads {stack.group(3)} B, shared {ck.metadata.shared} B")


def main():
    HV, K, V, BT = 32, 128, 128, 64
    f32, bf16, i32 = "*fp32", "*bf16", "*i32"
    chain_types = dict(w=bf16, qg=bf16, kd=bf16, dl=f32, Aqk=f32, do=bf16, dht=f32, dh=f32, dvnew=f32,
                       dh0=f32, cu_seqlens=i32, chunk_offsets=i32)
    prod_types = dict(h=f32, vnew=f32, dh=f32, dvnew=f32, do=bf16, dqg=f32, dw=f32, dkd=f32, dA=f32, ddl=f32,
                      chunk_bounds=i32)
    for bv in (32, 64):
        for nw in (4, 8):
            for ns in (1, 2):
                r = ptxas_report(kda_state_grad_chain_kernel, chain_types,
                                 dict(HV=HV, K=K, V=V, BK=K, BV=bv, BT=BT, HAS_DHT=True, STORE_DH0=True,
                                      NUM_STAGES=ns, EMULATE=False), nw, ns)
                print(f"chain    K=V=128 BV={bv:3d} warps={nw} stages={ns}: {r}")
    for bk in (64, 128):
        for bv in (32, 64):
            for nw in (4, 8):
                for ns in (1, 2, 3):
                    r = ptxas_report(kda_state_grad_products_kernel, prod_types,
                                     dict(HV=HV, K=K, V=V, BK=bk, BV=bv, BT=BT), nw, ns)
                    print(f"products K=V=128 BK={bk:3d} BV={bv:3d} warps={nw} stages={ns}: {r}")
    fp32_types = {n: (f32 if t == bf16 else t) for n, t in chain_types.items()}
    for bv, nw, ns in ((32, 4, 1), (32, 8, 1), (32, 8, 2), (64, 8, 1)):
        r = ptxas_report(kda_state_grad_chain_kernel, fp32_types,
                         dict(HV=HV, K=K, V=V, BK=K, BV=bv, BT=BT, HAS_DHT=True, STORE_DH0=True,
                              NUM_STAGES=ns, EMULATE=False), nw, ns)
        print(f"chain fp32 inputs K=V=128 BV={bv:3d} warps={nw} stages={ns}: {r}")
    for bv, nw, ns in ((16, 8, 1), (32, 8, 1)):
        r = ptxas_report(kda_state_grad_chain_kernel, chain_types,
                         dict(HV=HV, K=256, V=V, BK=256, BV=bv, BT=BT, HAS_DHT=True, STORE_DH0=True,
                              NUM_STAGES=ns, EMULATE=False), nw, ns)
        print(f"chain    K=256 V=128 BV={bv:3d} warps={nw} stages={ns}: {r}")


if __name__ == "__main__":
    main()
