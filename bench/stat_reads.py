"""Does reading the base once for all experts make the CPU's statistics passes faster?

DARE's L1 rescale runs two passes over a tensor before its merge: max |x_i - base| per expert (model_stock's
first pass too), then the fixed-point L1 sums of |x_i - base| over all and over the kept entries.
`cpu_fused.max_abs(base, xs)` and `cpu_fused.l1_fixed(base, xs, ...)` read each block of the base once for all
N experts (N + 1 reads); one call per expert reads the base N times (2 N reads), though a base that fits the
cache is then read from the cache. Times both ways of each, alternating per round, in one thread, on bf16
(or --dtype) chunks (the L1 sums with drawn keep masks of density 0.3); prints medians (ns per entry and
expert) and their ratio, and checks both give the same values.

    python bench/stat_reads.py                           # N in {4, 8}, chunks of 2^18 and 2^22
    python bench/stat_reads.py --experts 8 --chunks 262144 --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_chunk_loop_args, compiled_loops_here, machine  # noqa: E402
from fusemerge.kernels import cpu_fused  # noqa: E402
from fusemerge.kernels.philox import dare_keep_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    add_chunk_loop_args(p)
    args = p.parse_args(argv)
    if not compiled_loops_here():
        return 1
    m = machine()
    dtype = getattr(torch, args.dtype)
    print(f"machine: {m['cpu']}, {m['cores']} cores; medians of {args.rounds} rounds, one thread, {args.dtype}\n\n"
          "| pass | experts | chunk | one call per expert, ns / entry / expert | one call for all | ratio |\n"
          "|---|---:|---:|---:|---:|---:|")
    ok = True
    for n_exp in args.experts:
        for n in args.chunks:
            g = torch.Generator().manual_seed(n_exp * n)
            base = torch.randn(n, generator=g).to(dtype)
            xs = [(base.float() + torch.randn(n, generator=g) * 0.01).to(dtype) for _ in range(n_exp)]
            keeps = [dare_keep_run(i + 1, 0, n, 0.3) for i in range(n_exp)]
            shifts = [40] * n_exp  # |d| ~ 0.01 < 2^-6 here: sums below 2^-6 * 2^40 * 2^22 = 2^56 < 2^62
            passes = {
                "max abs d": {"each": lambda base=base, xs=xs: [cpu_fused.max_abs(base, [x])[0] for x in xs],
                            "all": lambda base=base, xs=xs: cpu_fused.max_abs(base, xs)},
                "L1 sums": {"each": lambda base=base, xs=xs, k=keeps: [
                                cpu_fused.l1_fixed(base, [x], [40], [m])[0] for x, m in zip(xs, k, strict=True)],
                            "all": lambda base=base, xs=xs, k=keeps, s=shifts: cpu_fused.l1_fixed(base, xs, s, k)},
            }
            for name, ways in passes.items():
                ok &= ways["each"]() == ways["all"]()
                times: dict[str, list[float]] = {w: [] for w in ways}
                for _ in range(args.rounds):
                    for w, call in ways.items():
                        t0 = time.perf_counter()
                        call()
                        times[w].append(time.perf_counter() - t0)
                ns = {w: statistics.median(v) / (n * n_exp) * 1e9 for w, v in times.items()}
                print(f"| {name} | {n_exp} | {n:,} | {ns['each']:.3f} | {ns['all']:.3f} | "
                      f"{ns['all'] / ns['each']:.2f} |")
    print(f"\nsame values: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
