"""The CPU's fixed-point dot products (slerp, model_stock, nuslerp): gcc's loop against the AVX2 one.

`cpu_fused.gram_fixed` sums, for every pair of a tensor's vectors, trunc(p) and trunc(frac(p) 2^32) of each
scaled product p (kernels/fixed_dots.py). gcc vectorizes its loop with AVX-512 (a vector double -> int64
conversion); without AVX-512 it converts one entry at a time, so AVX2 machines run `fixed_add_avx2`, which
keeps both parts as doubles and sums them exactly (cpu_fused.gram_loop() says which one a machine runs).
Times both loops, alternating per round, in one thread, on bf16 (or --dtype) chunks, for the models themselves
(--vectors 2: slerp's and nuslerp's three sums) and for deltas from a base (4: model_stock of four models, ten
sums); prints medians in ns per entry and pair, their ratio, and checks both give the same integers.

    python bench/gram_loops.py
    python bench/gram_loops.py --vectors 2 --chunks 262144 --dtype float32
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
from fusemerge.kernels import cpu_fused, fixed_dots  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, nargs="+", default=[2, 4])
    add_chunk_loop_args(p)
    args = p.parse_args(argv)
    if not compiled_loops_here():
        return 1
    lib = cpu_fused._library()
    m = machine()
    dtype = getattr(torch, args.dtype)
    print(f"machine: {m['cpu']}, {m['cores']} cores; gram_fixed runs loop {cpu_fused.gram_loop()} here; medians "
          f"of {args.rounds} rounds, one thread, {args.dtype}\n\n"
          "| vectors | of | chunk | pairs | gcc's loop (0), ns / entry / pair | AVX2 loop (1) | ratio |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
    ok = True
    for nv in args.vectors:
        for n in args.chunks:
            g = torch.Generator().manual_seed(nv * n)
            base = torch.randn(n, generator=g).to(dtype)
            xs = [(base.float() + torch.randn(n, generator=g) * 0.01).to(dtype) for _ in range(nv)]
            of_base = nv > 2  # model_stock's deltas; two vectors: the models themselves (slerp, nuslerp)
            b = base if of_base else None
            vs = [x.float() - (b.float() if of_base else 0.0) for x in xs]
            shifts = {(i, j): fixed_dots.shift_for(float(vs[i].abs().max() * vs[j].abs().max()))
                      for i in range(nv) for j in range(i, nv)}
            found = {loop: cpu_fused._gram_fixed(lib, b, xs, shifts, loop) for loop in (0, 1)}
            if found[1] is None:
                print(f"| {nv} | - | {n:,} | {len(shifts)} | - | not on this machine (no AVX2) | - |")
                continue
            ok &= found[0] == found[1] == fixed_dots.gram_fixed_torch(b, xs, shifts)
            times: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(args.rounds):
                for loop in (0, 1):
                    t0 = time.perf_counter()
                    cpu_fused._gram_fixed(lib, b, xs, shifts, loop)
                    times[loop].append(time.perf_counter() - t0)
            ns = {loop: statistics.median(v) / (n * len(shifts)) * 1e9 for loop, v in times.items()}
            print(f"| {nv} | {'deltas' if of_base else 'models'} | {n:,} | {len(shifts)} | {ns[0]:.3f} | "
                  f"{ns[1]:.3f} | {ns[1] / ns[0]:.2f} |")
    print(f"\nsame integers (both loops and the torch operations): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
