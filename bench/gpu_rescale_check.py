"""Does a trim's L1 rescale give the CPU's bytes on the GPU? (one question of bench/gpu_checks.sh)

`rescale: true` of ties / breadcrumbs runs its fixed-point L1 sums on the GPU through reference.l1_fixed_top's
torch operations (triton_select.l1_fixed_top); checks, on `DEV` (default cuda), that rescaled merges through the
Triton backend equal the CPU torch backend bit for bit (bf16, fp16, fp32; three chunkings), that l1_fixed_top on
the device equals the CPU's for every kind of index cut (EMPTY_T with a cut among them), and that a NaN delta gives
a trim the factor 1 whatever the chunking. Prints one `ok` / `FAIL` line per case; exit 1 on any failure.

    python bench/gpu_rescale_check.py                      # on the GPU, 2^20 entries per tensor
    python bench/gpu_rescale_check.py --device cpu --n 4096  # the same on CPU (Triton's interpreter), small
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def _device_arg(argv: list[str]) -> str:
    """--device's value, read before argparse: Triton's interpreter must be chosen before its import."""
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return "cuda"


if _device_arg(sys.argv[1:]) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusemerge import merge_tensors  # noqa: E402
from fusemerge.kernels import reference, triton_select  # noqa: E402
from fusemerge.kernels.params import EMPTY_C, EMPTY_T  # noqa: E402

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="where the Triton backend runs (cpu: the interpreter)")
    p.add_argument("--n", type=int, default=1 << 20, help="entries per tensor")
    args = p.parse_args(argv)
    dev, n = torch.device(args.device), args.n
    g = torch.Generator().manual_seed(0)
    fails = 0

    def report(ok: bool, what: str) -> None:
        nonlocal fails
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = torch.randn(n, generator=g).to(dtype)
        experts = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
        for method, kw in (("ties", {}), ("breadcrumbs_ties", {"gamma": 0.01}), ("breadcrumbs", {"gamma": 0.01})):
            ref = merge_tensors(base, experts, method, density=0.3, rescale=True, backend="torch", **kw)
            plain = merge_tensors(base, experts, method, density=0.3, rescale=False, backend="torch", **kw)
            report(not torch.equal(ref, plain), f"rescale changes {method} {dtype} (else the check is vacuous)")
            for chunk in (n, n // 16 + 7, 1000):
                out = merge_tensors(base.to(dev), [e.to(dev) for e in experts], method, density=0.3, rescale=True,
                                    backend="triton", chunk=chunk, **kw)
                report(torch.equal(out.cpu().view(BITS[dtype]), ref.view(BITS[dtype])),
                       f"rescaled {method} {dtype} chunk={chunk}")
    x = torch.randn(4096, generator=g)
    b = torch.zeros(4096)
    t_mid = int(reference.abs_bits(reference.delta(b, x)).sort().values[3000])
    for cut in [(t_mid, 0, EMPTY_T, EMPTY_C), (t_mid, 2000, EMPTY_T, EMPTY_C), (EMPTY_T, 100, EMPTY_T, EMPTY_C),
                (EMPTY_T, 0, EMPTY_T, EMPTY_C), (0, 0, t_mid, 1000)]:
        for start in (0, 1500):
            cpu = reference.l1_fixed_top(b, x, 40, start, cut)
            gpu = triton_select.l1_fixed_top(b.to(dev), x.to(dev), 40, start, cut)
            report(cpu == gpu, f"l1_fixed_top cut={cut} start={start}: {cpu} {gpu}")
    e = torch.linspace(0.01, 0.64, 64)
    e[40] = float("nan")
    outs = [merge_tensors(torch.zeros(64, device=dev), [e.to(dev)], "ties", density=0.5, rescale=r, chunk=c,
                          backend="triton").cpu() for r in (True, False) for c in (64, 32)]
    report(all(torch.equal(o.view(torch.int32), outs[-1].view(torch.int32)) for o in outs),
           "a NaN delta gives a trim the factor 1 whatever the chunking")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
