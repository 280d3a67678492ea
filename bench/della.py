"""DELLA benchmark: what does DELLA's rank-based keep cost next to DARE's, on one tensor?

della and della_linear rank every delta in its row (a stable sort of |d|, kernels/della.py) before drawing
DARE's Philox stream, and their L1 rescale runs that twice (a statistics pass, then the merge pass); dare_ties
is the same merge with a flat keep probability. One [rows, cols] tensor of bf16 weights, N experts,
`fusemerge.merge_tensors` (the Python API, the files path's chunks) with --chunk elements per chunk; every
method is run once untimed first (compilation, the compiled CPU loops' build), then --repeats times; medians
of the wall clock (synchronized on CUDA). Every timed run must give the bytes of the first (checked).

    python bench/della.py                              # CPU, one thread (the executor's workers use one each)
    python bench/della.py --device cuda --rows 8192 --cols 8192 --experts 8 --chunk 16777216
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import append_csv, machine  # noqa: E402

METHODS = ["dare_ties", "della", "della_linear"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--rows", type=int, default=2816)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--density", type=float, default=0.3)
    p.add_argument("--epsilon", type=float, default=0.15)
    p.add_argument("--chunk", type=int, default=1 << 18, help="elements per chunk (della: whole rows of it)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "della.csv")
    args = p.parse_args(argv)

    from fusemerge import merge_tensors

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    base = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    experts = [(base.float() + 0.002 * torch.randn(shape, generator=g)).to(torch.bfloat16)
               for _ in range(args.experts)]
    base, experts = base.to(device), [x.to(device) for x in experts]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(method: str) -> torch.Tensor:
        extra = {"epsilon": args.epsilon} if method.startswith("della") else {}
        return merge_tensors(base, experts, method, density=args.density, name="model.layers.0.mlp.up_proj.weight",
                             chunk=args.chunk, **extra)

    rows = []
    for method in args.methods:
        first = run(method)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run(method)
            sync()
            times.append(time.perf_counter() - t0)
            if not torch.equal(out, first):
                raise AssertionError(f"{method}: a timed run gave other bytes than the first")
        rows.append({"method": method, "median_s": statistics.median(times), "min_s": min(times)})

    m = machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{m['cpu']}, {m['cores']} cores, 1 thread"
    command = " ".join(["python bench/della.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# DELLA vs DARE: {args.experts} experts x [{args.rows}, {args.cols}] bf16, density {args.density}, "
          f"chunk {args.chunk:,}\n\n- device: {where}\n- torch {torch.__version__}\n- command: `{command}`\n\n"
          "| method | median s | min s | / dare_ties |\n|---|---:|---:|---:|")
    ref = next((r["median_s"] for r in rows if r["method"] == "dare_ties"), None)
    for r in rows:
        ratio = f"{r['median_s'] / ref:.2f}x" if ref else ""
        print(f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {ratio} |")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    append_csv(args.results, [{"date": now, "device": where, "experts": args.experts, "rows": args.rows,
                               "cols": args.cols, "density": args.density, "chunk": args.chunk, "method": r["method"],
                               "median_s": f"{r['median_s']:.6g}", "min_s": f"{r['min_s']:.6g}",
                               "command": command} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
