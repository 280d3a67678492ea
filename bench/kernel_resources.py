"""Offline resource report of the merge kernel: registers, stack, SASS size and global loads, per launch choice.

No GPU needed: each variant is compiled for sm_90 with Triton's bundled ptxas (as tests/kernels does) and its
cubin read with the bundled cuobjdump / nvdisasm. Registers decide how many warps fit an SM, so how many loads
are in flight: the model behind `kernels/triton_merge.py: UNROLL, LATE_COUNT` (bench/RESULTS.md). It measures
no speed; bench/kernels.py does, on a GPU.

    python bench/kernel_resources.py                       # ties, dare_ties, breadcrumbs_ties, task arithmetic
    python bench/kernel_resources.py --experts 16 --block 512 --num-warps 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {  # name: (SPARSIFIER, SIGN, LINEAR, NORMALIZE)
    "linear": (0, False, True, True),
    "task_arithmetic": (0, False, False, False),
    "ties": (1, True, False, True),
    "dare_ties": (2, True, False, True),
    "breadcrumbs_ties": (3, True, False, True),
}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def compile_variant(kernel, n: int, variant: tuple, count: bool, block: int, warps: int, unroll: int,
                    late: bool) -> dict:
    """Compile one variant for sm_90 (bf16 inputs); its registers, stack bytes, SASS count and loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"out_ptr": "*bf16", "base_ptr": "*bf16", "x_ptr": "*bf16", "f_ptr": "*fp32", "i_ptr": "*i64",
           "nf_ptr": "*i64", "row_stride": "i32", "n": "i32", "start": "i64"}
    names = ["N", "SPARSIFIER", "SIGN", "LINEAR", "NORMALIZE", "COUNT", "BLOCK", "UNROLL", "LATE_COUNT"]
    sig.update(dict.fromkeys(names, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    sp, sign, linear, norm = variant
    const = dict(zip(names, [n, sp, sign, linear, norm, count, block, unroll, late], strict=True))
    k = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    instrs = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    blocks = min(REGS_PER_SM // (per_warp * warps), MAX_WARPS_PER_SM // warps)
    return {"regs": regs, "stack": int(re.search(r"STACK:(\d+)", res).group(1)), "sass": len(instrs),
            "ldg128": sum("LDG.E.128" in line for line in instrs),
            "barriers": sum("BAR.SYNC" in line for line in instrs), "warps_per_sm": blocks * warps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"],
                   choices=list(VARIANTS))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from fusemerge.kernels import triton_merge as tm

    block = args.block or tm.BLOCK
    warps = args.num_warps or tm.NUM_WARPS
    command = " ".join(["python bench/kernel_resources.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# Merge kernel resources, sm_90 (offline), bf16, N = {args.experts}, BLOCK {block}, num_warps {warps}\n"
          f"\n- command: `{command}`\n- count: NaN / Inf counted (nonfinite=, as merges run); defaults: "
          f"unroll {tm.UNROLL}, late_count {tm.LATE_COUNT}\n")
    print("| method | count | unroll | late_count | registers | stack B | warps / SM | SASS | LDG.128 | BAR.SYNC |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in args.methods:
        for count, unroll, late in ((False, 1, False), (True, 1, False), (True, 2, False), (True, 1, True),
                                    (True, 2, True)):
            r = compile_variant(tm._merge_kernel, args.experts, VARIANTS[name], count, block, warps, unroll, late)
            print(f"| {name} | {count} | {unroll} | {late} | {r['regs']} | {r['stack']} | {r['warps_per_sm']} | "
                  f"{r['sass']} | {r['ldg128']} | {r['barriers']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
